"""CPU twins of what Megatron-core 0.16.1 takes from CUDA, each keeping the contract it replaces.

The CPU run makes the GPU run's Megatron-core calls in the GPU run's order (``device.py``); this
module supplies, only when CUDA is absent, what those calls need from CUDA. Each twin must fail
where the original would fail on a GPU, so that a CPU test catches a GPU bug. Every patch, with the
upstream symbol it replaces (megatron-core 0.16.1, torch 2.13):

``torch.cuda.current_device``                 -> the CPU device (Megatron allocates buffers on it)
``torch.cuda.Stream/Event/current_stream/stream/synchronize``
                                              -> no-op streams; an event completes the host copies
                                                 recorded before it (see ``HostCopy``)
``megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER`` (+ ``_INITIALIZED``,
``initialize_rng_tracker``)                   -> ``CpuRNGStatesTracker``: fork of an unseeded state
                                                 raises Megatron's error, as on GPU
``tensor_parallel.model_parallel_cuda_manual_seed`` (module and package)
                                              -> same names and seed offsets, CPU generator states
``moe.token_dispatcher.maybe_move_tensor_to_cpu`` (its import of ``moe_utils``'s)
                                              -> ``HostCopy``: split sizes unreadable until the
                                                 event at Megatron's cuda_sync_point completes
``pipeline_parallel.schedules.torch`` (the module's name for torch)
                                              -> torch, except that ``torch.zeros(device="cuda")``
                                                 (the token counter each schedule allocates)
                                                 lands on the CPU
``tensor_parallel.mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim``
                                              -> uneven splits built from equal-sized collectives
                                                 (gloo has no uneven all_gather/reduce_scatter)

On every machine, GPU included: ``moe.moe_utils.te_general_gemm`` is defined as None when Transformer
Engine is absent (0.16.1 reads it unguarded), and so are ``transformer.multi_latent_attention``'s
``TELinear`` / ``TEColumnParallelLinear`` replaced by a class nothing is an instance of (without TE,
0.16.1 subclasses a ``MagicMock`` there, so MLA's ``isinstance(self.linear_proj, TELinear)`` raises). ``enable()`` is idempotent. One Megatron-core private is
touched outside this module, for a reason that is not CUDA: ``training/checkpoint.py``'s
``protect_checkpoint_writer`` (see its docstring).
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


class HostCopy:
    """CPU twin of a non-blocking device-to-host copy of split sizes.

    On GPU, Megatron's dispatcher copies its all-to-all split sizes to the host with
    ``non_blocking=True`` at its ``cuda_dtoh_point`` and only waits for the copy
    (``d2h_event.synchronize()``) at its ``cuda_sync_point``; reading the numpy array in between
    reads whatever the buffer held. On CPU the copy is instant, which would hide such a read, so
    this object refuses every read until the event recorded after it is synchronized, and then
    behaves like the numpy array the GPU run has.
    """

    def __init__(self, tensor: torch.Tensor):
        self._array = tensor.detach().cpu().numpy().copy()
        self._ready = False

    def _value(self):
        if not self._ready:
            raise RuntimeError(
                "read of dispatcher split sizes before Megatron's cuda_sync_point: on GPU this "
                "host copy is still in flight (non-blocking device-to-host), so the value would "
                "be stale; read it only after _maybe_dtoh_and_synchronize reached the sync point"
            )
        return self._array

    def mark_ready(self) -> None:
        self._ready = True

    def tolist(self):
        return self._value().tolist()

    def __array__(self, dtype=None, copy=None):
        value = self._value()
        return value if dtype is None else value.astype(dtype)

    def __iter__(self):
        return iter(self._value())

    def __len__(self):
        return len(self._value())

    def __getitem__(self, index):
        return self._value()[index]

    def sum(self, *args, **kwargs):
        return self._value().sum(*args, **kwargs)


# Copies started since the last event was recorded: the next event completes them.
_PENDING_COPIES: list = []


def _cpu_maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """CPU twin of ``moe_utils.maybe_move_tensor_to_cpu`` for the dispatcher's split sizes."""
    if as_numpy and torch.is_tensor(tensor):
        copy = HostCopy(tensor)
        _PENDING_COPIES.append(copy)
        return copy
    return tensor


class _NullEvent:
    """Stands in for ``torch.cuda.Event``; completes the host copies started before it."""

    def __init__(self, *args, **kwargs):
        self._copies = list(_PENDING_COPIES)
        _PENDING_COPIES.clear()

    def synchronize(self) -> None:
        for copy in self._copies:
            copy.mark_ready()

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: kernels are synchronous, copies are not."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


_NULL_STREAM = _NullStream()


class CpuRNGStatesTracker:
    """CPU twin of Megatron-core's ``CudaRNGStatesTracker``, with its contract.

    Named CPU generator states; ``fork(name)`` runs a region under that state and restores the
    default afterwards. As in Megatron, forking a state that was never added (the tracker was
    not seeded through ``model_parallel_cuda_manual_seed``) raises, and so does adding a seed or
    a name twice.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception("seed {} already exists".format(seed))
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception("cuda rng state {} already exists".format(name))
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception("cuda rng state {} is not added".format(name))
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _uneven_collectives_over_gloo() -> None:
    """gloo's all_gather / reduce_scatter take equal-sized tensors only, but Megatron's
    sequence-parallel gather and reduce-scatter take per-rank split sizes when the expert-tensor-
    parallel dispatcher moves a data-dependent number of tokens. Same contract, built from the
    equal-sized collectives: pad every rank's slice to the largest, run the collective, drop
    the padding."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[i * longest: i * longest + n] for i, n in enumerate(sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest * len(sizes), *input_.shape[1:]))
        for i, chunk in enumerate(torch.split(input_, sizes, dim=0)):
            padded[i * longest: i * longest + sizes[i]] = chunk
        out = input_.new_empty((longest, *input_.shape[1:]))
        dist.reduce_scatter_tensor(out, padded, group=group)
        return out[: sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


class _TorchWithCudaLiteralOnCpu:
    """``torch`` as Megatron's pipeline schedules see it on CPU: every attribute is torch's own,
    but a tensor allocated with the literal ``device="cuda"`` (0.16.1's ``total_num_tokens``
    counter, which ``torch.cuda.current_device`` cannot redirect) is allocated on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _schedules_allocate_on_cpu() -> None:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCudaLiteralOnCpu()


class _AbsentTransformerEngineClass:
    """Stands in for a Transformer Engine class when TE is not installed (never instantiated)."""


def _patch_missing_te_symbols() -> None:
    """megatron-core 0.16.1's router_gating_linear reads ``te_general_gemm`` even when TE is not
    installed (the import that would define it is skipped): define it as None so the plain torch
    path is taken; and MLA's TE class names must be classes (see below). Needed on any machine
    without Transformer Engine, GPU or not."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    from megatron.core.transformer import multi_latent_attention as mla

    # Without TE, megatron.core.extensions.transformer_engine defines its TE classes by
    # subclassing a MagicMock, which yields MagicMock *instances*: MLA's isinstance checks on them
    # raise TypeError. A class no module is an instance of keeps MLA's non-TE branches, which is
    # what those checks select when TE is absent.
    for name in ("TELinear", "TEColumnParallelLinear"):
        if not isinstance(getattr(mla, name, None), type):
            setattr(mla, name, _AbsentTransformerEngineClass)


def enable() -> None:
    """Install the CPU shims if (and only if) CUDA is unavailable."""
    global _ENABLED
    _patch_missing_te_symbols()
    if _ENABLED or cuda_available():
        return
    _ENABLED = True

    # Buffers allocated "on the current device" land on the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Stream/event plumbing becomes a no-op: CPU ops complete before they return.
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda device=None: _NULL_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None

    from megatron.core.tensor_parallel import random as mcore_random

    tracker = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.initialize_rng_tracker = lambda *a, **k: None

    # model_parallel_cuda_manual_seed would seed the CUDA generator; on CPU the same seeds,
    # with Megatron's offsets, go into the CPU tracker.
    def _cpu_model_parallel_seed(seed, te_rng_tracker=False, inference_rng_tracker=False,
                                 use_cudagraphable_rng=False, tp_rank=None, ep_rank=None,
                                 etp_rank=None, force_reset_rng=False):
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        ep_rank = ps.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
        etp_rank = ps.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
        tracker.reset()
        tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(
            mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
        )

    mcore_random.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed
    import megatron.core.tensor_parallel as tp_pkg

    tp_pkg.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed

    _uneven_collectives_over_gloo()
    _schedules_allocate_on_cpu()

    # The dispatcher's non-blocking host copies of its split sizes: see HostCopy.
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_maybe_move_tensor_to_cpu
