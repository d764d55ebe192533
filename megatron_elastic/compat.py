"""CPU compatibility layer for Megatron-core.

Megatron-core 0.16 assumes CUDA in a handful of places that a CPU run reaches:

* ``torch.cuda.current_device()`` is used as the device of freshly allocated buffers
  (RoPE frequencies, router buffers, tensor-parallel gather outputs);
* ``MoEAlltoAllTokenDispatcher`` creates a ``torch.cuda.Stream`` for its device-to-host copies
  and records events on it;
* the CUDA RNG tracker (``get_cuda_rng_tracker``) reads and writes CUDA generator states.

Everything else (GPTModel, MoE layers, parallel_state over gloo, DDP, dist_checkpointing) runs
unchanged. This module patches exactly those three things, and only when CUDA is absent, so a CPU
run exercises the real Megatron-core code paths. ``enable()`` is idempotent; with CUDA present it
does nothing, which keeps GPU runs free of any of this.
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: every operation is already synchronous."""

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


class _NullEvent:
    def synchronize(self) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


_NULL_STREAM = _NullStream()


class CpuRNGStatesTracker:
    """CPU twin of Megatron-core's ``CudaRNGStatesTracker``.

    Keeps named CPU generator states so that ``fork(name)`` runs a region under that state and
    restores the default one afterwards, the contract model-parallel dropout relies on.
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
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_missing_te_symbols() -> None:
    """megatron-core 0.16.1's router_gating_linear reads ``te_general_gemm`` even when TE is not
    installed (the import that would define it is skipped): define it as None so the plain torch
    path is taken. Needed on any machine without Transformer Engine, GPU or not."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


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

    # model_parallel_cuda_manual_seed would call torch.cuda.manual_seed; on CPU the seeds go
    # into the CPU tracker with the same offsets Megatron uses.
    def _cpu_model_parallel_seed(seed, *args, **kwargs):
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank()
        ep_rank = ps.get_expert_model_parallel_rank()
        etp_rank = ps.get_expert_tensor_parallel_rank()
        tracker.reset()
        torch.manual_seed(seed)
        offset = seed + 2718
        tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, offset + tp_rank)
        tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(
            mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
            offset + 100 + 1024 * ep_rank + etp_rank,
        )

    mcore_random.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed
    import megatron.core.tensor_parallel as tp_pkg

    tp_pkg.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed


def is_enabled() -> bool:
    return _ENABLED
