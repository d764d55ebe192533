"""launchers/finetune.sh end to end on a tiny random Qwen3-MoE with its own chat tokenizer.

The model (transformers' Qwen3MoeConfig, random weights, save_pretrained) and a byte-level BPE
tokenizer with a ChatML template are written to one Hugging Face directory; the test writes a chat
jsonl and runs the one command: import -> held-out split and chat preprocessing -> EMoE fine-tune
(configs/finetune_emoe.yaml, shortened by overrides) -> export -> k' sweep. The exported model must
load with AutoModelForCausalLM and take a new k' through set_hf_inference_k.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO

import slurm_utils as su

sys.path.insert(0, str(REPO / "tests" / "data"))
from chat_fixtures import chat_records, save_chat_tokenizer, write_jsonl  # noqa: E402

FINETUNE = REPO / "launchers" / "finetune.sh"
SHORT = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-3",
         "train.lr_warmup_iters=2", "train.eval_interval=0", "train.eval_iters=2", "model.seq_length=64",
         "checkpoint.save_interval=null", "logging.log_interval=2"]


def tiny_qwen3_moe(directory: Path) -> Path:
    """Random 2-layer Qwen3-MoE (4 experts, top-2) with a chat tokenizer, in one HF directory."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    save_chat_tokenizer(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    Qwen3MoeForCausalLM(config).save_pretrained(str(directory))
    return directory


def run_finetune(hf_dir, data, run_dir, *overrides, **env):
    environment = dict(os.environ, PYTHON=sys.executable, RUN_DIR=str(run_dir), NPROC="1", **env)
    return subprocess.run(["bash", str(FINETUNE), str(hf_dir), str(data), *overrides], cwd=REPO,
                          capture_output=True, text=True, env=environment, timeout=600)


@pytest.mark.slow
def test_finetune_imports_trains_exports_and_sweeps_k(tmp_path):
    """A first start is stopped by SIGTERM mid-training (exit 75, checkpoint); the same command
    again skips the import and data steps, resumes, and finishes with the export and the sweep."""
    from transformers import AutoModelForCausalLM

    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, set_hf_inference_k

    hf_dir = tiny_qwen3_moe(tmp_path / "hf")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    run = tmp_path / "run"
    env = dict(KS="1-4", HOLDOUT_EVERY="10", EVAL_ITERS="1", WORKERS="1")

    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(["bash", str(FINETUNE), str(hf_dir), str(data), *SHORT, "train.train_iters=300"],
                                 cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=dict(os.environ, PYTHON=sys.executable, RUN_DIR=str(run), NPROC="1", **env))
        su.wait_for(lambda: "iter      2/300" in log.read_text() or first.poll() is not None, 300,
                    "the first start to train", on_timeout=lambda: log.read_text()[-3000:])
        first.send_signal(signal.SIGTERM)  # to finetune.sh only: it forwards to the launcher
        assert first.wait(timeout=300) == 75, log.read_text()[-4000:]
    text = log.read_text()
    assert "wrote 54 conversations" in text and "wrote 6 conversations" in text  # 10% held out
    assert "checkpoint.load=" + str(run / "imported") + " checkpoint.finetune=true" in text
    assert "stopping at iteration" in text and "run the same command again" not in text
    stopped = int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < 30

    proc = run_finetune(hf_dir, data, run, *SHORT, "train.train_iters=30", **env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count("skipped") == 2 and f"resumed from {run / 'checkpoints'} at iteration {stopped}" in out
    assert "chat data " + str(run / "data" / "train_chat_document") + " (train): 54 conversations" in out
    # Training: the EMoE recipe on the imported model.
    saved = yaml.safe_load((run / "checkpoints" / "iter_0000030" / "run_config.yaml").read_text())
    assert saved["elastic"]["schedule"] == "fixed" and saved["elastic"]["pool_ratio"] == 2.0
    assert saved["elastic"]["router_loss_coeff"] == 1e-8 and saved["model"]["num_moe_experts"] == 4
    assert saved["data"]["valid_data_path"] == [str(run / "data" / "heldout_chat_document")]
    # The k' table, on the held-out conversations.
    sweep = json.loads((run / "eval" / "elastic_eval.json").read_text())
    table = (run / "eval" / "elastic_eval.txt").read_text()
    assert table in proc.stdout
    losses = {row["k"]: row["loss"] for row in sweep["results"] if row["kind"] == "k"}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    # Scored on the replies only: 4 held-out sequences of 64 positions hold far fewer assistant
    # tokens than positions (about 250 would be counted without the loss mask).
    assert sweep["eval"]["split"] == "valid" and 0 < sweep["eval"]["tokens"] < 0.6 * 4 * 64

    # The export: plain transformers, elastic metadata, k' settable.
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["elastic_moe"]["pool_ratio"] == 2.0 and config["elastic_moe"]["k_train"] == 2
    model = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    tokens = torch.tensor([[5, 17, 99, 3, 250, 7]])
    logits = {}
    for k in (1, 4):
        set_hf_inference_k(model, k)
        assert get_hf_inference_k(model) == [k, k]
        with torch.no_grad():
            logits[k] = model(tokens).logits
    assert torch.isfinite(logits[1]).all() and not torch.allclose(logits[1], logits[4])


@pytest.mark.parametrize("recipe, schedule, k_range, pool, lam", [
    ("finetune_emoe.yaml", "fixed", (4, 4), 2.0, 1e-8),
    ("finetune_mmoe.yaml", "layerwise", (1, 4), None, 0.0),
])
def test_finetune_recipes_take_k_from_the_imported_model(tmp_path, recipe, schedule, k_range, pool, lam):
    """As finetune.sh composes them: the imported recipe as base, the fine-tune recipe on top. The
    k range follows the imported top-k (4 of 16 here), whatever elastic section the import carried."""
    from megatron_elastic.config import load_config
    from megatron_elastic.config.recipes import read_recipe

    imported = tmp_path / "megatron_config.yaml"
    imported.write_text(yaml.safe_dump({
        "model": {"num_moe_experts": 16, "moe_router_topk": 4, "seq_length": 256},
        "checkpoint": {"load": str(tmp_path), "finetune": True},
        "elastic": {"schedule": "batch", "k_min": 2, "k_max": 6, "eval_k": 3, "pool_ratio": 1.5}}))
    run = tmp_path / "finetune.yaml"
    run.write_text(yaml.safe_dump({"base": str(imported), **read_recipe(REPO / "configs" / recipe)}))
    cfg = load_config(run)
    e = cfg.elastic
    assert (e.schedule, (e.k_min, e.k_max), e.pool_ratio, e.router_loss_coeff) == (schedule, k_range, pool, lam)
    assert e.eval_k is None and e.top_p is None and cfg.model.num_moe_experts == 16
    assert (cfg.train.lr, cfg.train.lr_warmup_iters, cfg.train.train_iters) == (1e-5, 30, 300)
    assert cfg.checkpoint.finetune and cfg.data.dataset_type is None


def test_finetune_refuses_bad_arguments(tmp_path):
    proc = run_finetune(tmp_path / "nohf", tmp_path / "x.jsonl", tmp_path / "run")
    assert proc.returncode == 2 and "has no config.json" in proc.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from su.cluster_for_tests(tmp_path_factory, nodes=2, cpus=2)


@pytest.mark.slurm
@pytest.mark.slow
def test_finetune_under_sbatch_trains_and_sweeps_with_two_ranks(cluster, tmp_path):
    """The same command as a batch job on 2 nodes x 1 task: training and the sweep run as one
    Slurm task per rank (expert parallel 2) through launchers/slurm/pretrain.sbatch."""
    hf_dir = tiny_qwen3_moe(tmp_path / "hf")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    run = tmp_path / "run"
    env = {"RUN_DIR": str(run), "PROJECT_DIR": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "KS": "1-4", "HOLDOUT_EVERY": "10", "EVAL_ITERS": "1", "WORKERS": "1"}
    job = cluster.submit(FINETUNE, [str(hf_dir), str(data), *SHORT, "train.train_iters=8",
                                    "parallel.expert_model_parallel_size=2"],
                         sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"],
                         env=env, cwd=tmp_path)
    info = cluster.wait(job, timeout=400)
    why = lambda: cluster.describe_job(job, info, run)  # noqa: E731
    assert info["JobState"] == "COMPLETED" and su.exit_code(info) == (0, 0), why()
    logs = su.rank_logs(run, job)
    assert sorted(logs) == [0, 1] and "world 2 (tp 1, pp 1, ep 2, dp 2)" in logs[0], why()
    assert "iter      8/8" in logs[0] and "elastic eval of" in logs[0] and "world 2" in logs[0], why()
    sweep = json.loads((run / "eval" / "elastic_eval.json").read_text())
    assert sweep["eval"]["world_size"] == 2 and sorted(r["k"] for r in sweep["results"]) == [1, 2, 3, 4]
    assert (run / "hf" / "config.json").is_file()
