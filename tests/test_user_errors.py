"""User errors end as one line and exit code 2; bad steps are skipped; dead ranks never hang.

* Vocabulary: a tokenizer larger than model.vocab_size, data whose ids do not fit the model (from
  the preprocessing sidecar, and sampled from a .bin another tool wrote), an HF directory whose
  tokenizer has more pieces than the embedding has rows.
* Unreadable inputs: garbage tokenizer bytes (training, preprocessing), a truncated safetensors
  file (convert_from_hf), a --character-coverage sentencepiece refuses.
* Non-finite steps: skipped, logged, counted in TensorBoard, and N in a row stop the run with
  exit 2 and no checkpoint.
* A rank that dies (SIGKILL) or hangs (SIGSTOP): its peer exits non-zero within the collective
  timeout; launchers/local.sh names the rank that failed first, without torchrun's traceback.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, free_port, run_tool, tiny_overrides

CONFIG = "configs/smoke.yaml"
LOCAL_SH = REPO / "launchers" / "local.sh"
ITER_RE = re.compile(r"iter\s+(\d+)/(\d+) \| loss")


# ----------------------------------------------------------------------------- helpers
def _env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MEGATRON_ELASTIC_TIMEOUT_S"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train(overrides: list, timeout: float = 180, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_elastic.train", "--config", CONFIG, *map(str, overrides)],
        cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def start_rank(rank: int, port: int, overrides: list, log: Path, **env) -> subprocess.Popen:
    f = open(log, "wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "megatron_elastic.train", "--config", CONFIG, *map(str, overrides)],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
            env=_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, **env),
        )
    finally:
        f.close()


def one_error_line(stderr: str, rank: int = 0) -> str:
    """The single `error [rank N]: ...` line; no traceback around it."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"error [rank {rank}]: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback (most recent call last)" not in stderr, stderr[-3000:]
    return lines[0]


def tool_error_line(proc: subprocess.CompletedProcess, tool: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{tool}: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def progressed(log: Path, at_least: int) -> bool:
    text = log.read_text(errors="replace") if log.exists() else ""
    return any(int(m.group(1)) >= at_least for m in ITER_RE.finditer(text))


def wait_until(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- vocabulary
@pytest.mark.slow
def test_tokenizer_larger_than_model_vocab(smoke_data, tmp_path):
    proc = train(tiny_overrides(smoke_data, tmp_path, **{"model.vocab_size": 256}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"data.tokenizer_model={smoke_data['tokenizer']} has 512 pieces but model.vocab_size=256" in line
    assert "set model.vocab_size >= 512" in line


@pytest.fixture(scope="module")
def big_vocab_data(smoke_data, tmp_path_factory) -> dict:
    """The first documents of the smoke corpus tokenized with a 1024-piece tokenizer."""
    root = tmp_path_factory.mktemp("big_vocab")
    corpus = root / "corpus.jsonl"
    with open(smoke_data["corpus"], encoding="utf-8") as src:
        corpus.write_text("".join(line for _, line in zip(range(12), src)), encoding="utf-8")
    run_tool("tools/train_tokenizer.py", "--input", str(corpus), "--output-prefix", str(root / "big"),
             "--vocab-size", "1024", "--num-threads", "2")
    run_tool("tools/preprocess_data.py", "--input", str(corpus), "--tokenizer-model", str(root / "big.model"),
             "--output-prefix", str(root / "corpus"), "--no-progress")
    return {"prefix": str(root / "corpus_text_document"), "tokenizer": root / "big.model"}


@pytest.mark.slow
def test_data_ids_beyond_vocab_from_the_preprocessing_record(smoke_data, big_vocab_data, tmp_path):
    import json

    prefix = big_vocab_data["prefix"]
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    assert meta["vocab_size"] == 1024 and 512 <= meta["max_token_id"] < 1024
    assert meta["tokenizer_model"] == str(big_vocab_data["tokenizer"].resolve())
    proc = train(tiny_overrides(smoke_data, tmp_path, **{"data.data_path": f"[{prefix}]"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert (f"data.data_path: {prefix} holds token id {meta['max_token_id']} (per {prefix}.meta.json: "
            f"tokenized with {big_vocab_data['tokenizer'].resolve()}, 1024 pieces) but the model "
            "vocabulary has 512 entries") in line
    assert f"re-run tools/preprocess_data.py with data.tokenizer_model={smoke_data['tokenizer']}" in line


def _write_indexed(prefix: Path, docs) -> None:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=DType.optimal_dtype(1024))
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


@pytest.mark.slow
def test_data_from_another_tool_is_sampled(smoke_data, tmp_path):
    """No sidecar (Megatron's IndexedDatasetBuilder, as another preprocessing tool writes):
    the trainer samples the .bin and refuses ids >= the model's 512 rows."""
    rng = np.random.default_rng(0)
    prefix = tmp_path / "foreign_text_document"
    _write_indexed(prefix, [rng.integers(0, 700, size=300) for _ in range(40)])
    assert not Path(str(prefix) + ".meta.json").exists()
    proc = train(tiny_overrides(smoke_data, tmp_path, **{"data.data_path": f"[{prefix}]"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert re.search(rf"data\.data_path: {re.escape(str(prefix))} holds token id (\d+) \(found in a "
                     rf"sample of \d+ tokens of {re.escape(str(prefix))}\.bin\) but the model vocabulary "
                     r"has 512 entries", line), line
    assert int(re.search(r"holds token id (\d+)", line).group(1)) >= 512
    assert "or set model.vocab_size >" in line


def test_stale_sidecar_is_ignored_and_small_ids_pass(tmp_path):
    """The record is trusted only while the data files keep the sizes it recorded; a sample of
    data whose ids fit finds its true maximum."""
    from megatron_elastic.data.meta import dataset_token_range, read_meta, write_meta

    prefix = tmp_path / "d_text_document"
    _write_indexed(prefix, [[5, 6, 7, 300], [9, 2]])
    write_meta(str(prefix), max_token_id=300, vocab_size=512, tokenizer_model=str(tmp_path / "t.model"),
               tokenizer_sha256="x", documents=2, tokens=6)
    found = dataset_token_range(str(prefix))
    assert (found.source, found.max_token_id, found.vocab_size) == ("sidecar", 300, 512)
    _write_indexed(prefix, [[5, 6, 7, 300], [9, 2, 800]])  # rewritten by another tool
    assert read_meta(str(prefix)) is None
    found = dataset_token_range(str(prefix))
    assert (found.source, found.max_token_id) == ("sampled", 800)


# ----------------------------------------------------------------------------- unreadable inputs
@pytest.mark.slow
def test_garbage_tokenizer_in_training(smoke_data, tmp_path):
    bad = tmp_path / "spm.model"
    bad.write_bytes(os.urandom(4096))
    proc = train(tiny_overrides(smoke_data, tmp_path, **{"data.tokenizer_model": bad}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"data.tokenizer_model: tokenizer {bad} is not a sentencepiece model" in line
    assert "tools/train_tokenizer.py" in line


@pytest.mark.slow
def test_garbage_tokenizer_in_preprocessing(smoke_data, tmp_path):
    bad = tmp_path / "spm.model"
    bad.write_bytes(os.urandom(4096))
    proc = run_tool("tools/preprocess_data.py", "--input", str(smoke_data["corpus"]), "--tokenizer-model",
                    str(bad), "--output-prefix", str(tmp_path / "out"), "--no-progress", check=False)
    line = tool_error_line(proc, "preprocess_data.py")
    assert f"tokenizer {bad} is not a sentencepiece model" in line and "tools/train_tokenizer.py" in line
    assert not list(tmp_path.glob("out*"))


def test_character_coverage_outside_sentencepiece_range(smoke_data, tmp_path):
    """sentencepiece dies on coverage < 0.98 with an internal CHECK; the tool says so in one
    line with the fix, and the lowest accepted value trains."""
    corpus = tmp_path / "c.jsonl"
    with open(smoke_data["corpus"], encoding="utf-8") as src:
        corpus.write_text("".join(line for _, line in zip(range(8), src)), encoding="utf-8")
    args = ["tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "600", "--num-threads", "2"]
    proc = run_tool(*args, "--output-prefix", str(tmp_path / "a"), "--character-coverage", "0.9", check=False)
    line = tool_error_line(proc, "train_tokenizer.py")
    assert "--character-coverage 0.9 is outside [0.98, 1]" in line and "0.9995" in line
    assert "usage:" not in proc.stderr
    run_tool(*args, "--output-prefix", str(tmp_path / "b"), "--character-coverage", "0.98")
    assert (tmp_path / "b.model").is_file()


def _tiny_hf(directory: Path, vocab: int) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=1,
                           eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(str(directory))


def _convert_from_hf(hf_dir: Path, output: Path) -> subprocess.CompletedProcess:
    return run_tool("tools/convert_from_hf.py", "--hf-dir", str(hf_dir), "--output", str(output),
                    "--no-progress", check=False, env=_env())


@pytest.mark.slow
def test_convert_from_hf_refuses_tokenizer_larger_than_embedding(smoke_data, tmp_path):
    hf = tmp_path / "hf"
    _tiny_hf(hf, vocab=256)
    shutil.copyfile(smoke_data["tokenizer"], hf / "tokenizer.model")  # 512 pieces
    proc = _convert_from_hf(hf, tmp_path / "out")
    line = tool_error_line(proc, "convert_from_hf.py")
    assert (f"{hf / 'tokenizer.model'} has 512 pieces but the model's embedding has 256 rows "
            f"(vocab_size in {hf / 'config.json'})") in line
    assert "use the tokenizer this model was trained with" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_convert_from_hf_names_a_truncated_safetensors_file(tmp_path):
    hf = tmp_path / "hf"
    _tiny_hf(hf, vocab=256)
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    proc = _convert_from_hf(hf, tmp_path / "out")
    line = tool_error_line(proc, "convert_from_hf.py")
    assert f"{weights} is not a readable safetensors file (" in line
    assert "truncated or corrupt; fetch the file again" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- non-finite steps
def test_non_finite_loss_reaches_the_gradient_norm_exactly():
    """The loss' finiteness is folded into one gradient element: bit-exact no-op for a finite
    loss, NaN for an infinite or NaN one (so the global norm is non-finite on every rank)."""
    from megatron_elastic.train import fold_loss_into_grad

    param = torch.nn.Parameter(torch.zeros(3, 2))
    param.main_grad = torch.tensor([[0.25, -1.5], [3.0, 4.0], [-0.0, 7.0]])
    before = param.main_grad.clone()
    fold_loss_into_grad(param, torch.tensor(6.25, dtype=torch.float64))
    assert torch.equal(param.main_grad, before)
    for bad in (math.inf, -math.inf, math.nan):
        param.main_grad = before.clone()
        fold_loss_into_grad(param, torch.tensor(bad, dtype=torch.float64))
        assert math.isnan(float(param.main_grad.view(-1)[0]))
        assert torch.equal(param.main_grad.view(-1)[1:], before.view(-1)[1:])
        assert not math.isfinite(float(param.main_grad.norm()))


def test_megatron_optimizer_skips_non_finite_norm_in_bf16():
    """Megatron-core's optimizer skips only an fp16 overflow; in bf16 it would apply NaN
    gradients. Ours checks the norm before the update."""
    from megatron_elastic.training.optim import MegatronOptimizer

    class Sub:
        is_stub_optimizer = False

        def get_parameters(self):
            return []

    class Fake:
        def __init__(self, norm):
            self.param_groups = [{"lr": 0.0}]
            self.chained_optimizers = [Sub()]
            self.norm, self.updates = norm, 0

        def prepare_grads(self):
            return False

        def get_grad_norm(self):
            return self.norm

        def step_with_ready_grads(self):
            self.updates += 1
            return True

    opt = object.__new__(MegatronOptimizer)
    opt.optimizer = Fake(float("nan"))
    applied, norm = opt.step(1e-3)
    assert not applied and math.isnan(norm) and opt.optimizer.updates == 0
    opt.optimizer = Fake(2.0)
    assert opt.step(1e-3) == (True, 2.0) and opt.optimizer.updates == 1
    assert opt.optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop_the_run(smoke_data, tmp_path):
    """An absurd learning rate: step 1 blows the weights up, every later gradient norm is NaN.
    Each such step is skipped (logged, counted in TensorBoard), and the third in a row stops
    the run with exit 2, naming the iteration, and saves nothing."""
    tb, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    proc = train(tiny_overrides(smoke_data, tmp_path, **{
        "train.lr": 1e30, "train.min_lr": 0, "train.train_iters": 20, "train.max_consecutive_skips": 3,
        "logging.tensorboard_dir": tb, "checkpoint.save": ckpt}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert ("iteration 4: 3 consecutive steps had a non-finite loss or gradient norm "
            "(train.max_consecutive_skips=3); stopped without saving: lower train.lr") in line
    for it, n in ((2, 1), (3, 2), (4, 3)):
        assert f"skipped step at iteration {it}: non-finite loss or gradient norm" in proc.stdout
        assert f"({n} in a row, {n} in total)" in proc.stdout
    progress = [ln for ln in proc.stdout.splitlines() if ITER_RE.search(ln)]
    assert len(progress) == 4 and "skipped" not in progress[0]
    assert all("skipped (non-finite grad)" in ln for ln in progress[1:])
    assert not any(ckpt.glob("iter_*")) and not (ckpt / "latest_checkpointed_iteration.txt").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/skipped_steps")] == [
        (1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)]


# ----------------------------------------------------------------------------- dead ranks
@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_peer_death_or_hang_ends_the_other_rank(smoke_data, tmp_path, how):
    """Two gloo ranks without a launcher that would clean up: rank 1 is killed (its sockets
    close) or frozen (they stay open) mid-training. Rank 0 exits non-zero with one line, at
    once for a dead peer and after the collective timeout (6 s here) for a frozen one."""
    timeout_s = 6
    overrides = tiny_overrides(smoke_data, tmp_path, **{
        "parallel.expert_model_parallel_size": 2, "train.train_iters": 2000, "logging.log_interval": 1})
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [start_rank(r, port, overrides, logs[r], MEGATRON_ELASTIC_TIMEOUT_S=timeout_s) for r in (0, 1)]
    try:
        wait_until(lambda: progressed(logs[0], 3), 150, "iteration 3", procs)
        t0 = time.monotonic()
        os.kill(procs[1].pid, getattr(signal, how))
        rc = procs[0].wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = logs[0].read_text(errors="replace")
    assert rc not in (0, None), out[-3000:]
    line = one_error_line(out)
    assert "lost contact with another rank" in line and "the rank that failed first has the cause" in line
    if how == "SIGSTOP":
        assert "Timed out" in line, line
        assert timeout_s - 1 <= elapsed < timeout_s + 60, elapsed
    else:
        assert elapsed < 60, elapsed


@pytest.mark.slow
@pytest.mark.multiproc
def test_local_launcher_names_the_rank_that_died_first(smoke_data, tmp_path):
    """local.sh -n 2, rank 1 SIGKILLed mid-run: exit 137 and one report line naming rank 1 and
    the signal, without torchrun's ChildFailedError traceback."""
    overrides = tiny_overrides(smoke_data, tmp_path, **{
        "parallel.expert_model_parallel_size": 2, "train.train_iters": 2000})
    log = tmp_path / "local.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["bash", str(LOCAL_SH), "-n", "2", CONFIG, *map(str, overrides)],
                                cwd=REPO, env=_env(PYTHON=sys.executable), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: progressed(log, 3), 150, "iteration 3", [proc])
        rank1 = training_process(proc.pid, rank=1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text(errors="replace")
    assert rc == 137, out[-3000:]
    assert "FAILED: rank 1 was killed by SIGKILL (exit 137) (first to fail; torchrun exit 1)" in out, out[-3000:]
    assert "ChildFailedError" not in out and "Traceback (most recent call last)" not in out, out[-3000:]


def training_process(root: int, rank: int):
    """pid of the python process of ``rank`` among the descendants of ``root``."""
    children: dict = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True,
                               text=True).stdout.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    todo, found = [root], None
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if (comm.startswith("python") and b"megatron_elastic.train" in cmdline
                    and f"RANK={rank}".encode() in environ):
                found = pid
    return found
