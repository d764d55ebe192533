"""Training entry point: ``python -m megatron_elastic.train --config configs/smoke.yaml [key=value ...]``.

One process per rank (torchrun, ``srun`` with one task per GPU, or plain ``python`` for one
process). Each iteration runs ``global_batch / (micro_batch * data_parallel)`` micro-batches
through Megatron-core's pipeline schedule (no pipelining, 1F1B or interleaved, by the layout;
``training/schedule.py``) with gradient accumulation inside Megatron-core's DDP, then one
optimizer step. Preemption: SIGTERM or
SIGUSR1 (SLURM's pre-timeout ``--signal``) lets the current step finish, saves a checkpoint and
exits with ``REQUEUE_EXIT_CODE`` so the launcher requeues the job; the next start resumes from
the ``latest`` tracker.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_elastic.config import Config, ConfigError, load_config
from megatron_elastic.device import policy

# EX_TEMPFAIL: "try again later". The sbatch launcher requeues the job when it sees this code.
REQUEUE_EXIT_CODE = 75


class NonFiniteError(RuntimeError):
    """train.max_consecutive_skips steps in a row had a non-finite loss or gradient norm."""


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
    from megatron_elastic.data.datasets import parse_blend

    parse_blend(cfg.data.data_path)
    if not cfg.data.tokenizer_model or not Path(cfg.data.tokenizer_model).exists():
        raise ConfigError(
            f"data.tokenizer_model={cfg.data.tokenizer_model!r} not found on this node: train one "
            "with tools/train_tokenizer.py and point data.tokenizer_model at the .model file, or "
            "at a Hugging Face tokenizer directory (with tokenizer.json)"
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


def evaluate(model, reader, cfg: Config, context, iteration_base: int = 0) -> float:
    """Validation loss over ``train.eval_iters`` global batches (training/evaluation.py)."""
    from megatron_elastic.training.evaluation import evaluate as evaluate_loss

    return evaluate_loss(model, reader, cfg.train.eval_iters, context, iteration_base)


def finite_guard(ddp) -> Optional[torch.nn.Parameter]:
    """A parameter of this rank's chunks (``ddp``: a list of DDP-wrapped chunks) reduced over the
    whole data-parallel group (not an expert weight), whose gradient carries the loss'
    finiteness into the gradient norm (see ``fold_loss_into_grad``)."""
    for chunk in (ddp if isinstance(ddp, (list, tuple)) else [ddp]):
        for p in chunk.module.parameters():
            if p.requires_grad and getattr(p, "allreduce", True) and getattr(p, "main_grad", None) is not None:
                return p
    return None


def fold_loss_into_grad(param: Optional[torch.nn.Parameter], loss_sum: torch.Tensor) -> None:
    """Make the step's gradient norm non-finite when its loss is, without a host sync.

    ``loss - loss`` is exactly 0 for a finite loss and NaN for an infinite or NaN one; added to
    one gradient element before the data-parallel reduction, it reaches every rank's copy, so the
    optimizer's global gradient norm (a host float it computes anyway, summed over pipeline
    stages too) is non-finite on every rank and every rank skips the same step. Under pipeline
    parallelism only the last stage has a loss; the others fold 0. Gradients are usually
    non-finite already when the loss is, but not always (an infinite per-token loss at a masked
    position has a zero gradient).
    """
    if param is not None:
        grad = param.main_grad.view(-1)[:1]
        grad.add_((loss_sum - loss_sum).to(grad.dtype))


def build(cfg: Config):
    """Parallel state, tokenizer, model, optimizer: the pieces a run needs.

    The model is this rank's list of model chunks (one per pipeline stage, several with virtual
    stages), returned bare and DDP-wrapped (``ddp``, the same list order)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_elastic import parallel
    from megatron_elastic.data.tokenizer import load_tokenizer
    from megatron_elastic.models.gpt import build_model_chunks
    from megatron_elastic.training.schedule import configure_grad_sync
    from megatron_elastic.training.optim import build_optimizer, use_distributed_optimizer

    from megatron_elastic.data.datasets import check_data

    env = parallel.initialize(cfg)
    check_environment(cfg)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    except ValueError as exc:  # unreadable files, or a tokenizer without an EOS token
        raise ConfigError(f"data.tokenizer_model: {exc}") from None
    # Before the model: token ids that do not fit the embedding would fail minutes in (a
    # device-side assert on GPU), and a chat/text mix only when the datasets are built.
    check_data(cfg, tokenizer)
    chunks = build_model_chunks(cfg, tokenizer.vocab_size)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
        # gloo has no ReduceOp.AVG: pre-scale and SUM instead.
        average_in_collective=False,
    )
    # Megatron-LM's wrapping: chunks after the first keep one bucket each.
    ddp = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                   disable_bucketing=i > 0)
           for i, chunk in enumerate(chunks)]
    configure_grad_sync(ddp)
    optimizer = build_optimizer(cfg, ddp)
    return env, tokenizer, chunks, ddp, optimizer, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def run(cfg: Config, max_iters: Optional[int] = None) -> TrainResult:
    """Train per ``cfg``; stop after ``max_iters`` iterations of this process if given."""
    from megatron.core import parallel_state as ps

    from megatron_elastic.training.checkpoint import (
        load_checkpoint,
        protect_checkpoint_writer,
        save_checkpoint,
    )
    from megatron_elastic.data.datasets import BatchReader, build_datasets
    from megatron_elastic.training.flops import flops_metrics
    from megatron_elastic.training.metrics import Logger, collect_moe_metrics
    from megatron_elastic.training.optim import lr_at
    from megatron_elastic.training.schedule import PipelineStep

    env, tokenizer, model, ddp, optimizer, dp_rank, dp_size = build(cfg)
    t, ck, p = cfg.train, cfg.checkpoint, cfg.parallel
    logger = Logger(cfg, env.rank, run_dir=ck.save)
    vp = f" x {p.virtual_pipeline_model_parallel_size} virtual" if p.virtual_pipeline_model_parallel_size else ""
    logger.print(
        f"model: {sum(q.numel() for c in model for q in c.parameters()):,} parameters on rank 0 | "
        f"world {env.world_size} (tp {p.tensor_model_parallel_size}, pp "
        f"{p.pipeline_model_parallel_size}{vp}, ep {p.expert_model_parallel_size}, dp {dp_size}) | "
        f"elastic {cfg.elastic.schedule} "
        f"k in [{cfg.elastic_k_min}, {cfg.elastic_k_max}]"
        + (f", pool x{cfg.elastic.pool_ratio}" if cfg.elastic.pool_ratio else "")
    )
    start = 0
    if ck.load:
        start = load_checkpoint(ck.load, model, optimizer, cfg, finetune=ck.finetune)
        if start:
            logger.print(f"resumed from {ck.load} at iteration {start}")
        if start >= t.train_iters and not ck.finetune:
            # Re-running a finished recipe is a resume with nothing left: say so, not silently.
            logger.print(f"nothing to train: {ck.load} is at iteration {start} >= train.train_iters="
                         f"{t.train_iters} (raise train.train_iters to train on, or set checkpoint.save "
                         "and checkpoint.load to a new directory to start over)")
    train_ds, valid_ds, _ = build_datasets(cfg, tokenizer, dp_size)
    train = BatchReader(train_ds, t.micro_batch_size, t.global_batch_size, dp_rank, dp_size)
    valid = BatchReader(valid_ds, t.micro_batch_size, t.global_batch_size, dp_rank, dp_size)
    context = model[0].elastic_context
    num_mb = train.num_microbatches
    # Megatron's schedule divides each micro-batch's loss by num_mb and sets the aux losses'
    # gradient scale (MoEAuxLossAutoScaler) to 1/num_mb after every forward.
    step = PipelineStep(ddp, train)
    if ck.save:
        protect_checkpoint_writer()  # before any signal can arrive: see its docstring
    signals = SignalFlag(t.exit_signal_handler)
    result = TrainResult(iteration=start)
    tokens_per_iter = t.global_batch_size * cfg.model.seq_length
    end = t.train_iters if max_iters is None else min(t.train_iters, start + max_iters)
    iteration = start
    # Per-iteration loss sums stay on the device and are read once per log interval (and
    # before an evaluation, save or stop), so the loop adds no per-micro-batch host sync.
    pending_losses: List[torch.Tensor] = []
    # Steps skipped for a non-finite loss or gradient norm: no update, logged, counted in
    # TensorBoard (train/skipped_steps); max_consecutive_skips in a row stop the run unsaved.
    guard = finite_guard(ddp)
    consecutive_skips = skipped_total = skipped_since_log = 0

    def flush_losses() -> None:
        if not pending_losses:
            return
        sums = torch.stack(pending_losses)
        if dist.is_initialized():
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
            if ps.get_pipeline_model_parallel_world_size() > 1:
                # The last stage holds the losses, the other stages zeros: every rank gets them.
                dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
        result.losses.extend((sums / (num_mb * dp_size)).tolist())
        pending_losses.clear()

    try:
        for chunk in ddp:
            chunk.train()
        t_log = time.time()
        while iteration < end:
            for chunk in ddp:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            # Megatron's schedule: every micro-batch's forward and backward (the elastic context
            # set before each forward), then fold_loss_into_grad and finalize_model_grads.
            loss_sum = step.train(iteration, partial(fold_loss_into_grad, guard))
            lr = lr_at(cfg, iteration)
            applied, grad_norm = optimizer.step(lr)
            iteration += 1
            if applied:
                consecutive_skips = 0
            else:
                consecutive_skips += 1
                skipped_total += 1
                skipped_since_log += 1
                logger.print(
                    f"skipped step at iteration {iteration}: non-finite loss or gradient norm "
                    f"(grad_norm {grad_norm}), no update ({consecutive_skips} in a row, "
                    f"{skipped_total} in total)"
                )
            pending_losses.append(loss_sum)
            result.iteration = iteration
            moe = collect_moe_metrics(num_mb)
            eval_due = t.eval_interval and iteration % t.eval_interval == 0 and iteration < end
            stop = signals.any_rank()
            save_due = ck.save and ck.save_interval and iteration % ck.save_interval == 0
            log_due = iteration % cfg.logging.log_interval == 0 or iteration == end
            if log_due or eval_due or save_due or stop:
                steps = len(pending_losses)
                flush_losses()
                dt = time.time() - t_log
                t_log = time.time()
            if log_due:
                rate = steps * tokens_per_iter / max(dt, 1e-9)
                logger.train_step(
                    iteration,
                    {"loss": result.losses[-1], "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": rate, "skipped": skipped_since_log,
                     "skipped_steps": skipped_total,
                     **flops_metrics(cfg, moe, rate, vocab_size=model[0].vocab_size,
                                     world_size=env.world_size),
                     **({"peak_mem_gib": policy().peak_memory_gib()} if policy().cuda else {})},
                    moe,
                )
                skipped_since_log = 0
            if t.max_consecutive_skips and consecutive_skips >= t.max_consecutive_skips:
                # Every rank saw the same global norm, so every rank stops here; nothing is saved.
                raise NonFiniteError(
                    f"iteration {iteration}: {consecutive_skips} consecutive steps had a non-finite "
                    f"loss or gradient norm (train.max_consecutive_skips={t.max_consecutive_skips}); "
                    "stopped without saving: lower train.lr, raise train.lr_warmup_iters or keep "
                    "train.clip_grad > 0, and resume from the last checkpoint"
                )
            if eval_due:
                logger.validation(iteration, evaluate(ddp, valid, cfg, context))
                t_log = time.time()  # evaluation time is not training throughput
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


_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting",
              "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective")


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank died or hung (gloo/NCCL's own messages)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return type(exc).__name__ in ("DistBackendError", "DistNetworkError") or any(
        marker in str(exc) for marker in _LOST_PEER)


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
    except (ConfigError, CheckpointError, parallel.RendezvousError, NonFiniteError) as exc:
        print(f"error [rank {rank}]: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        # Not this rank's fault: one line instead of a collective's traceback.
        print(f"error [rank {rank}]: lost contact with another rank ({str(exc).splitlines()[0][:300]})"
              ": the rank that failed first has the cause (launchers/local.sh and the Slurm job log "
              "name it); a hung peer is given up on after parallel.distributed_timeout_minutes",
              file=sys.stderr, flush=True)
        return 1
    finally:
        parallel.destroy()
    if result.preempted:
        return REQUEUE_EXIT_CODE
    if result.valid_loss is not None and rank == 0:
        print(f"final validation loss {result.valid_loss:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
