"""Training entry point: ``python -m megatron_elastic.train --config configs/smoke.yaml [key=value ...]``.

One process per rank (torchrun, ``srun`` with one task per GPU, or plain ``python`` for one
process). Each iteration runs ``global_batch / (micro_batch * data_parallel)`` micro-batches with
gradient accumulation inside Megatron-core's DDP, then one optimizer step. Preemption: SIGTERM or
SIGUSR1 (SLURM's pre-timeout ``--signal``) lets the current step finish, saves a checkpoint and
exits with ``REQUEUE_EXIT_CODE`` so the launcher requeues the job; the next start resumes from
the ``latest`` tracker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_elastic.config import Config, ConfigError, load_config
from megatron_elastic.device import policy

# EX_TEMPFAIL: "try again later". The sbatch launcher requeues the job when it sees this code.
REQUEUE_EXIT_CODE = 75


@dataclass
class TrainResult:
    iteration: int = 0
    losses: List[float] = field(default_factory=list)  # training loss per iteration run here
    valid_loss: Optional[float] = None
    preempted: bool = False
    checkpoint: Optional[str] = None


class SignalFlag:
    """Records SIGTERM/SIGUSR1 so the loop can stop at a step boundary; never interrupts a save."""

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            print(f"[rank {_rank()}] received signal {signum}: will checkpoint after this step",
                  file=sys.stderr, flush=True)
        self.received = signum

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_environment(cfg: Config) -> None:
    """Problems worth one clear line before any model is built."""
    from megatron_elastic.training.data import parse_blend

    parse_blend(cfg.data.data_path)
    if not cfg.data.tokenizer_model or not Path(cfg.data.tokenizer_model).is_file():
        raise ConfigError(
            f"data.tokenizer_model={cfg.data.tokenizer_model!r} not found on this node: train one "
            "with tools/train_tokenizer.py and point data.tokenizer_model at the .model file"
        )
    save = cfg.checkpoint.save
    if save:
        path = Path(save)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"checkpoint.save={save} is not writable on this node ({exc.strerror}): choose a "
                "directory this user can write on shared storage"
            ) from exc
    load = cfg.checkpoint.load
    if load and cfg.checkpoint.finetune and not Path(load).exists():
        raise ConfigError(f"checkpoint.load={load} does not exist (finetune needs a checkpoint)")


def loss_from_batch(model, batch) -> torch.Tensor:
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def evaluate(model, reader, cfg: Config, context, iteration_base: int = 0) -> float:
    """Mean loss over ``eval_iters`` global batches of ``reader`` (averaged over ranks)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for it in range(cfg.train.eval_iters):
            for mb in range(reader.num_microbatches):
                context.set(iteration_base + it, mb, reader.sample_offset(mb))
                batch = policy().to_device(reader.get(iteration_base + it, mb))
                total[0] += float(loss_from_batch(model, batch))
                total[1] += 1
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        dist.all_reduce(total, group=ps.get_data_parallel_group())
    model.train()
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
    return float(total[0] / total[1])


def build(cfg: Config):
    """Parallel state, tokenizer, model (DDP-wrapped), optimizer: the pieces a run needs."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_elastic import parallel
    from megatron_elastic.data.tokenizer import SentencePieceTokenizer
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.optim import build_optimizer, use_distributed_optimizer

    env = parallel.initialize(cfg)
    check_environment(cfg)
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    model = build_model(cfg, tokenizer.vocab_size)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer(cfg),
            # gloo has no ReduceOp.AVG: pre-scale and SUM instead.
            average_in_collective=False,
        ),
        module=model,
    )
    optimizer = build_optimizer(cfg, ddp)
    return env, tokenizer, model, ddp, optimizer, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def run(cfg: Config, max_iters: Optional[int] = None) -> TrainResult:
    """Train per ``cfg``; stop after ``max_iters`` iterations of this process if given."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_elastic.moe.router import elastic_routers
    from megatron_elastic.training.checkpoint import (
        load_checkpoint,
        protect_checkpoint_writer,
        save_checkpoint,
    )
    from megatron_elastic.training.data import BatchReader, build_datasets
    from megatron_elastic.training.metrics import Logger, collect_moe_metrics
    from megatron_elastic.training.optim import lr_at

    env, tokenizer, model, ddp, optimizer, dp_rank, dp_size = build(cfg)
    t, ck = cfg.train, cfg.checkpoint
    logger = Logger(cfg, env.rank, run_dir=ck.save)
    logger.print(
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters on rank 0 | world "
        f"{env.world_size} (tp {cfg.parallel.tensor_model_parallel_size}, ep "
        f"{cfg.parallel.expert_model_parallel_size}, dp {dp_size}) | elastic {cfg.elastic.schedule} "
        f"k in [{cfg.elastic_k_min}, {cfg.elastic_k_max}]"
        + (f", pool x{cfg.elastic.pool_ratio}" if cfg.elastic.pool_ratio else "")
    )
    start = 0
    if ck.load:
        start = load_checkpoint(ck.load, model, optimizer, cfg, finetune=ck.finetune)
        if start:
            logger.print(f"resumed from {ck.load} at iteration {start}")
    train_ds, valid_ds, _ = build_datasets(cfg, tokenizer, dp_size)
    train = BatchReader(train_ds, t.micro_batch_size, t.global_batch_size, dp_rank, dp_size)
    valid = BatchReader(valid_ds, t.micro_batch_size, t.global_batch_size, dp_rank, dp_size)
    context = model.elastic_context
    routers = elastic_routers(model)
    num_mb = train.num_microbatches
    # Megatron scales aux-loss gradients like the main loss (which we divide by num_mb).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_mb))
    if ck.save:
        protect_checkpoint_writer()  # before any signal can arrive: see its docstring
    signals = SignalFlag(t.exit_signal_handler)
    result = TrainResult(iteration=start)
    tokens_per_iter = t.global_batch_size * cfg.model.seq_length
    end = t.train_iters if max_iters is None else min(t.train_iters, start + max_iters)
    iteration = start
    try:
        ddp.train()
        while iteration < end:
            t0 = time.time()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            loss_sum = torch.zeros(1, dtype=torch.float64)
            for mb in range(num_mb):
                context.set(iteration, mb, train.sample_offset(mb))
                batch = policy().to_device(train.get(iteration, mb))
                sync = contextlib.nullcontext() if mb == num_mb - 1 else ddp.no_sync()
                with sync:
                    loss = loss_from_batch(ddp, batch)
                    (loss / num_mb).backward()
                for router in routers:
                    router.log_k()
                loss_sum += float(loss.detach())
            finalize_model_grads([ddp])
            lr = lr_at(cfg, iteration)
            applied, grad_norm = optimizer.step(lr)
            iteration += 1
            if dist.is_initialized():
                from megatron.core import parallel_state as ps

                dist.all_reduce(loss_sum, group=ps.get_data_parallel_group())
            mean_loss = float(loss_sum / (num_mb * dp_size))
            result.losses.append(mean_loss)
            result.iteration = iteration
            moe = collect_moe_metrics(num_mb)
            if iteration % cfg.logging.log_interval == 0 or iteration == end:
                dt = time.time() - t0
                logger.train_step(
                    iteration,
                    {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_per_iter / max(dt, 1e-9), "skipped": not applied},
                    moe,
                )
            if t.eval_interval and iteration % t.eval_interval == 0 and iteration < end:
                logger.validation(iteration, evaluate(ddp, valid, cfg, context))
            stop = signals.any_rank()
            save_due = ck.save and ck.save_interval and iteration % ck.save_interval == 0
            if ck.save and (save_due or stop):
                result.checkpoint = str(save_checkpoint(ck.save, model, optimizer, cfg, iteration))
                logger.print(f"saved checkpoint at iteration {iteration} to {result.checkpoint}")
            if stop:
                result.preempted = True
                logger.print(f"stopping at iteration {iteration} on signal (exit {REQUEUE_EXIT_CODE})")
                return result
        if ck.save and result.losses and (not ck.save_interval or iteration % ck.save_interval):
            result.checkpoint = str(save_checkpoint(ck.save, model, optimizer, cfg, iteration))
            logger.print(f"saved checkpoint at iteration {iteration} to {result.checkpoint}")
        if t.eval_iters:
            result.valid_loss = evaluate(ddp, valid, cfg, context)
            logger.validation(iteration, result.valid_loss)
        return result
    finally:
        signals.restore()
        logger.close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m megatron_elastic.train",
        description="Train an elastic MoE GPT with Megatron-core.",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from megatron_elastic import parallel
    from megatron_elastic.training.checkpoint import CheckpointError

    args = parse_args(argv)
    rank = parallel.read_dist_env().rank if "MASTER_PORT" in os.environ else 0
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg)
    except (ConfigError, CheckpointError, parallel.RendezvousError) as exc:
        print(f"error [rank {rank}]: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.destroy()
    if result.preempted:
        return REQUEUE_EXIT_CODE
    if result.valid_loss is not None and rank == 0:
        print(f"final validation loss {result.valid_loss:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
