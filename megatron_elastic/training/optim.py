"""Optimizers and the learning-rate schedule.

On GPU the optimizer is Megatron-core's (``get_megatron_optimizer``: mixed precision, the
distributed optimizer, its grad-norm clipping over model-parallel groups). Megatron's wrappers
allocate CUDA tensors unconditionally, so on CPU ``TorchAdamW`` stands in: ``torch.optim.AdamW``
over the DDP gradient buffers, the global gradient norm computed over the same groups Megatron
uses, and a sharded state dict built with Megatron's own ``optim_state_to_sharding_state`` so
checkpoints have the same layout either way.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)

from megatron_elastic.config import Config
from megatron_elastic.device import policy


def lr_at(cfg: Config, iteration: int) -> float:
    """Linear warmup to ``lr`` then cosine/linear/constant decay to ``min_lr`` (Megatron's shape)."""
    t = cfg.train
    if t.lr_warmup_iters and iteration < t.lr_warmup_iters:
        return t.lr * (iteration + 1) / t.lr_warmup_iters
    if t.lr_decay_style == "constant":
        return t.lr
    decay_iters = t.lr_decay_iters or t.train_iters
    span = max(1, decay_iters - t.lr_warmup_iters)
    ratio = min(1.0, max(0.0, (iteration - t.lr_warmup_iters) / span))
    if t.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return t.min_lr + coeff * (t.lr - t.min_lr)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() < 2 or "norm" in name or name.endswith(".bias")


def _chunks(model) -> list:
    """The rank's model chunks (pipeline stages with virtual stages hold several)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def param_groups(model, weight_decay: float) -> List[dict]:
    decay, no_decay = [], []
    for chunk in _chunks(model):
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients of the model, counting each parameter shard exactly once.

    Dense replicated parameters (norms, router) are identical on every rank after DDP reduction and
    are counted locally; tensor-parallel shards are summed over the TP group; expert parameters are
    summed over the expert (x expert-tensor) model-parallel group, since each of its ranks holds
    different experts. Under pipeline parallelism each stage holds other layers: the stage's sum
    (the same on every rank of the stage after the reductions above) is summed over the pipeline
    group. This mirrors Megatron's get_grad_norm_fp32 grouping (model-parallel group = TP x PP for
    dense parameters, expert-tensor x expert x pipeline group for experts).
    """
    dense = torch.zeros((), dtype=torch.float64)
    tp_sharded = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is None:
            continue
        sq = g.detach().double().pow(2).sum().cpu()
        if not getattr(p, "allreduce", True):
            expert += sq
        elif getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            tp_sharded += sq
        else:
            dense += sq
    if dist.is_initialized():
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(tp_sharded, group=ps.get_tensor_model_parallel_group())
        emp = ps.get_expert_tensor_and_model_parallel_group()
        if emp is not None and dist.get_world_size(emp) > 1:
            dist.all_reduce(expert, group=emp)
    total = dense + tp_sharded + expert
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total.sqrt())


class TorchAdamW:
    """AdamW on CPU with Megatron-compatible clipping and sharded checkpoints."""

    def __init__(self, cfg: Config, model):
        t = cfg.train
        self.model = model
        self.clip_grad = t.clip_grad
        self.optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            foreach=False,
        )

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def step(self, lr: float) -> Tuple[bool, float]:
        """Returns (applied, grad_norm). Non-finite norms skip the update, as Megatron does."""
        params = self.parameters()
        for p in params:
            if getattr(p, "main_grad", None) is not None:
                p.grad = p.main_grad.to(p.dtype)
        norm = global_grad_norm(params)
        if not math.isfinite(norm):
            self.zero_grad()
            return False, norm
        if self.clip_grad and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        return True, norm

    def _init_state(self) -> None:
        for p in self.parameters():
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False):
        self._init_state()
        state_dict = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        steps = {float(s["step"]) for s in state_dict["state"].values() if "step" in s}
        if len(steps) > 1:
            raise ValueError("optimizer step differs across parameters; cannot checkpoint")
        optim_state_to_sharding_state(state_dict, id_map, exclude_keys="step")
        state_dict["state"]["common_step"] = steps.pop() if steps else 0.0
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        step = state_dict["state"].pop("common_step")
        for param_state in state_dict["state"].values():
            param_state["step"] = torch.tensor(float(step))
        current = self.optimizer.state_dict()
        state_dict["param_groups"] = [
            {**saved, "params": cur["params"]}
            for saved, cur in zip(state_dict["param_groups"], current["param_groups"])
        ]
        self.optimizer.load_state_dict(state_dict)


class MegatronOptimizer:
    """Megatron-core's optimizer (GPU): distributed optimizer, mixed precision, clipping."""

    def __init__(self, cfg: Config, ddp_model):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_elastic.models.gpt import use_bf16

        t = cfg.train
        bf16 = use_bf16(cfg)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.lr,
                min_lr=t.min_lr,
                weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2,
                adam_eps=t.adam_eps,
                clip_grad=t.clip_grad,
                bf16=bf16,
                params_dtype=torch.bfloat16 if bf16 else torch.float32,
                use_distributed_optimizer=use_distributed_optimizer(cfg),
            ),
            _chunks(ddp_model),
        )

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self, lr: float) -> Tuple[bool, float]:
        """Returns (applied, grad_norm); a non-finite norm skips the update.

        Megatron's ``step()`` skips only on an fp16 loss-scale overflow: in bf16 or fp32 it
        clips with a NaN norm (a no-op, NaN < 1 is false) and applies NaN gradients. So this is
        its ChainedOptimizer.step with the norm checked between clipping and the update: the
        same calls in the same order, and the norm (one all-reduce) computed once.
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        for group in opt.param_groups:
            group["lr"] = lr
        if opt.prepare_grads():  # fp16: inf/NaN found while unscaling
            return False, float("nan")
        grad_norm = opt.get_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            return False, grad_norm
        for sub in getattr(opt, "chained_optimizers", [opt]):
            if getattr(sub, "is_stub_optimizer", False):
                continue
            params = sub.get_parameters()
            if params and sub.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(
                    params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        return bool(opt.step_with_ready_grads()), grad_norm

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False):
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading)

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)


def use_distributed_optimizer(cfg: Config) -> bool:
    flag = cfg.train.use_distributed_optimizer
    return policy().default_distributed_optimizer if flag is None else bool(flag)


def build_optimizer(cfg: Config, ddp_model):
    if policy().supports_megatron_optimizer:
        return MegatronOptimizer(cfg, ddp_model)
    if cfg.train.use_distributed_optimizer:
        raise ValueError(
            "train.use_distributed_optimizer=true needs CUDA (Megatron-core's distributed "
            "optimizer allocates CUDA buffers); leave it unset on CPU"
        )
    return TorchAdamW(cfg, ddp_model)
