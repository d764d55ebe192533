"""Training telemetry: the progress line, TensorBoard, Weights & Biases, per-layer MoE losses.

MoE routers record their losses (load balancing, z-loss, hierarchical router loss) and the k each
layer used in Megatron-core's per-layer aux-loss tracker. ``collect_moe_metrics`` reduces that
tracker across ranks the way Megatron's ``track_moe_metrics`` does, but with SUM + divide instead of
``ReduceOp.AVG``, which gloo lacks, so the same numbers appear on CPU and GPU.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from megatron_elastic.config import Config
from megatron_elastic.device import policy


def collect_moe_metrics(num_microbatches: int) -> Dict[str, List[float]]:
    """Per-layer values averaged over micro-batches and data-parallel ranks; clears the tracker.

    Each value is a vector over the model's global layers. Under pipeline parallelism a stage
    fills only its own layers' entries, so the vectors are summed over the pipeline group (as
    Megatron's ``reduce_aux_losses_tracker_across_ranks`` does); a name that some stage never
    logged (one without MoE layers) takes part in that sum with zeros.
    """
    tracker = get_moe_layer_wise_logging_tracker()
    out: Dict[str, List[float]] = {}
    dp_group = ps.get_data_parallel_group(with_context_parallel=False)
    dp_size = dist.get_world_size(dp_group) if dist.is_initialized() else 1
    pp_group = None
    names = {name: tracker[name]["values"].numel() for name in tracker}
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        gathered: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(gathered, names, group=pp_group)
        names = {name: n for stage in gathered for name, n in stage.items()}
    for name in sorted(names):
        if name in tracker:
            values = tracker[name]["values"].detach().float().clone()
            if dist.is_initialized():
                group = tracker[name].get("reduce_group")
                if group is not None:
                    # Megatron's semantics (reduce_aux_losses_tracker_across_ranks): a value logged
                    # with a reduce group is each rank's share of a group-wide loss, so SUM it.
                    dist.all_reduce(values, group=group)
                if dp_size > 1 and not tracker[name].get("reduce_group_has_dp", False):
                    dist.all_reduce(values, group=dp_group)
                    values /= dp_size
        else:  # stage-local groups agree: no rank of this stage logged it
            values = torch.zeros(names[name], device=policy().device)
        if pp_group is not None:
            dist.all_reduce(values, group=pp_group)
        out[name] = (values / max(1, num_microbatches)).tolist()
    clear_aux_losses_tracker()
    return out


class Logger:
    """Rank-0 progress line + TensorBoard + W&B (offline unless an API key is configured)."""

    def __init__(self, cfg: Config, rank: int, run_dir: Optional[str] = None):
        self.cfg = cfg
        self.rank = rank
        self.tb = None
        self.wandb = None
        self._t0 = time.time()
        if rank != 0:
            return
        lg = cfg.logging
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=lg.tensorboard_dir)
        if lg.wandb_project:
            mode = lg.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            if mode != "disabled":
                import wandb

                self.wandb = wandb.init(
                    project=lg.wandb_project,
                    name=lg.wandb_exp_name,
                    dir=lg.wandb_save_dir or run_dir or lg.tensorboard_dir or ".",
                    mode=mode,
                    config=cfg.to_dict(),
                    resume="allow",
                )

    def print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def train_step(self, iteration: int, stats: dict, moe: Dict[str, List[float]]) -> None:
        if self.rank != 0:
            return
        parts = [
            f"iter {iteration:6d}/{self.cfg.train.train_iters}",
            f"loss {stats['loss']:.6f}",
            f"lr {stats['lr']:.3e}",
            f"grad_norm {stats['grad_norm']:.4f}",
            f"tokens/s {stats['tokens_per_s']:.0f}",
        ]
        if "tflops_per_device" in stats:
            parts.append(f"TFLOP/s/dev {stats['tflops_per_device']:.4g}")
        if "mfu" in stats:
            parts.append(f"MFU {100 * stats['mfu']:.1f}%")
        if "peak_mem_gib" in stats:
            parts.append(f"peak mem {stats['peak_mem_gib']:.2f} GiB")
        moe = self._moe_layers_only(moe)
        for name, values in moe.items():
            if name == "k":
                parts.append("k " + ",".join(f"{v:g}" for _, v in values))
            else:
                mean = sum(v for _, v in values) / max(1, len(values))
                parts.append(f"{name} {mean:.4g}")
        if stats.get("skipped"):
            parts.append("skipped (non-finite grad)")
        print(" | ".join(parts), flush=True)
        scalars = {f"train/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        for name, values in moe.items():
            scalars[f"moe/{name}"] = sum(v for _, v in values) / max(1, len(values))
            for layer, v in values:
                scalars[f"moe/{name}_layer_{layer}"] = v
        self._write(scalars, iteration)

    def _moe_layers_only(self, moe: Dict[str, List[float]]) -> Dict[str, List[tuple]]:
        """(global layer, value) of the MoE layers: Megatron's tracker has one slot per layer and
        dense layers (model.moe_layer_freq) leave theirs at 0, which is no k and no loss."""
        layers = self.cfg.model.moe_layers
        return {name: [(i, values[i]) for i in layers] if len(values) == self.cfg.model.num_layers
                else list(enumerate(values)) for name, values in moe.items()}

    def validation(self, iteration: int, loss: float, tag: str = "valid") -> None:
        if self.rank != 0:
            return
        import math

        ppl = math.exp(min(loss, 50.0))
        print(f"validation at iter {iteration}: {tag} loss {loss:.6f} | ppl {ppl:.3f}", flush=True)
        self._write({f"{tag}/loss": loss, f"{tag}/ppl": ppl}, iteration)

    def _write(self, scalars: dict, iteration: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
