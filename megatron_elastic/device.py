"""The one place where a CPU run and a GPU run part ways.

Everything that differs between the two is decided here, once, from whether CUDA is present:
the device tensors live on, the collective backend, the default precision, whether Megatron's
distributed optimizer is the default, whether the Transformer Engine layer spec is used, and
whether an RNG state belongs in checkpoints. The rest of the package asks this module and never
tests ``torch.cuda.is_available()`` itself (the compatibility layer is the only other place that
looks, because its job is to stand in for CUDA).

What does *not* differ is as important: both runs initialise weights with
``use_cpu_initialization=False`` inside the RNG tracker's fork and seed that tracker through
``tensor_parallel.model_parallel_cuda_manual_seed`` (on CPU ``compat`` redirects it to a CPU twin
of the tracker with the same contract), so the CPU suite walks the GPU's Megatron calls in the
GPU's order.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DevicePolicy:
    cuda: bool
    te_importable: bool

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")

    @property
    def use_te_spec(self) -> bool:
        """Transformer Engine's layer spec needs both TE and a GPU to run its kernels on."""
        return self.cuda and self.te_importable

    @property
    def default_bf16(self) -> bool:
        return self.cuda

    @property
    def default_distributed_optimizer(self) -> bool:
        # Megatron's optimizer allocates its grad/param buffers on CUDA.
        return self.cuda

    @property
    def supports_megatron_optimizer(self) -> bool:
        return self.cuda

    def set_local_device(self, local_rank: int) -> None:
        if self.cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())

    def to_device(self, batch: dict) -> dict:
        if not self.cuda:
            return batch
        return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def move_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.cuda() if self.cuda else module

    def rng_state(self) -> dict:
        state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if self.cuda and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.cuda else "cpu"


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401 (probe only)
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def policy() -> DevicePolicy:
    cuda = torch.cuda.is_available()
    return DevicePolicy(cuda=cuda, te_importable=cuda and _te_importable())


def seed_all(seed: int) -> None:
    """Seed every generator a run uses, the way Megatron-LM's ``_set_random_seed`` does.

    Must run after the parallel state exists (the tracker's seeds are offset by TP/EP rank) and
    before the model is built (weight initialisation forks the tracker's states).
    """
    from megatron.core import tensor_parallel

    from megatron_elastic import compat

    compat.enable()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
