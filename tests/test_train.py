"""Backbone: model forward/backward, expert-parallel equivalence, exact resume, checkpoint errors."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import REPO, run_distributed, run_tool, tiny_overrides, train_run

SMOKE = REPO / "configs" / "smoke.yaml"


def _forward_backward(rank, world_size, overrides):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model

    cfg = load_config(SMOKE, overrides)
    parallel.initialize(cfg)
    try:
        model = build_model(cfg, vocab_size=500)
        vocab = model.vocab_size
        tokens = torch.randint(0, vocab, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(cfg.model.seq_length).unsqueeze(0).expand(2, -1)
        loss = model(tokens, pos, None, labels=tokens)
        mean = loss.mean()
        mean.backward()
        grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.grad is not None}
        return {"shape": tuple(loss.shape), "loss": float(mean), "vocab": vocab, "grads": grads,
                "params": sum(p.numel() for p in model.parameters())}
    finally:
        parallel.destroy()


def test_model_forward_backward_cpu(smoke_data, tmp_path):
    overrides = tiny_overrides(smoke_data, tmp_path, **{"model.qk_layernorm": "true"})
    (out,) = run_distributed(_forward_backward, 1, overrides, tmp_dir=tmp_path)
    assert out["shape"] == (2, 32)
    # Untrained: the loss sits near the uniform cross-entropy log(V).
    assert abs(out["loss"] - math.log(out["vocab"])) < 0.5
    grads = out["grads"]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight",
                 "decoder.layers.0.mlp.router.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
                 "decoder.layers.0.self_attention.q_layernorm.weight", "decoder.final_layernorm.weight"):
        assert grads[name] > 0, name
    expert_grads = [v for n, v in grads.items() if ".experts." in n]
    assert len(expert_grads) == 2 * 4 * 2 and sum(v > 0 for v in expert_grads) >= 8


@pytest.mark.multiproc
@pytest.mark.slow
def test_expert_parallel_2_matches_single_process(smoke_data, tmp_path):
    """Same data, same weights (layout-independent init): EP=2 on 2 ranks == 1 rank, 3 steps."""
    common = {"train.train_iters": 3, "train.global_batch_size": 4, "train.micro_batch_size": 2}
    single = run_distributed(train_run, 1, tiny_overrides(smoke_data, tmp_path, **common), tmp_dir=tmp_path)[0]
    ep2 = run_distributed(
        train_run, 2,
        tiny_overrides(smoke_data, tmp_path, **common, **{"parallel.expert_model_parallel_size": 2}),
        tmp_dir=tmp_path,
    )
    assert len(single["losses"]) == 3
    for rank_result in ep2:
        assert rank_result["losses"] == pytest.approx(single["losses"], abs=1e-5)
    # Training did something: the loss moved.
    assert single["losses"][0] != single["losses"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("elastic", ["fixed", "layerwise_pool"])
def test_resume_is_exact(smoke_data, tmp_path, elastic):
    """A run stopped at step 3 and resumed gives the uninterrupted run's losses bit for bit."""
    extra = {"train.train_iters": 6, "train.lr_warmup_iters": 2}
    if elastic == "layerwise_pool":
        extra.update({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 2,
                      "elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 1e-3})

    def overrides(ckpt):
        return tiny_overrides(smoke_data, tmp_path, **extra,
                              **{"checkpoint.save": str(ckpt), "checkpoint.load": str(ckpt)})

    full = run_distributed(train_run, 1, overrides(tmp_path / "full"), tmp_dir=tmp_path)[0]
    first = run_distributed(train_run, 1, overrides(tmp_path / "split"), 3, tmp_dir=tmp_path)[0]
    assert first["iteration"] == 3
    assert (tmp_path / "split" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = run_distributed(train_run, 1, overrides(tmp_path / "split"), tmp_dir=tmp_path)[0]
    assert second["iteration"] == 6
    assert first["losses"] + second["losses"] == full["losses"]  # bitwise, CPU fp32
    assert second["valid"] == full["valid"]
    if elastic == "fixed":
        # Re-running the finished recipe trains nothing and says so.
        proc = run_tool("-m", "megatron_elastic.train", "--config", str(SMOKE), *overrides(tmp_path / "full"))
        assert "nothing to train" in proc.stdout and "at iteration 6 >= train.train_iters=6" in proc.stdout


def _load_mismatched(rank, world_size, overrides, ckpt):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import CheckpointError, load_checkpoint

    cfg = load_config(SMOKE, overrides)
    parallel.initialize(cfg)
    try:
        model = build_model(cfg, vocab_size=512)
        try:
            load_checkpoint(ckpt, model, None, cfg)
        except CheckpointError as exc:
            return str(exc)
        return None
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_checkpoint_shape_mismatch_names_tensor(smoke_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_distributed(train_run, 1, tiny_overrides(smoke_data, tmp_path, **{
        "train.train_iters": 1, "checkpoint.save": str(ckpt)}), tmp_dir=tmp_path)
    message = run_distributed(
        _load_mismatched, 1,
        tiny_overrides(smoke_data, tmp_path, **{"model.moe_ffn_hidden_size": 48}), str(ckpt),
        tmp_dir=tmp_path,
    )[0]
    assert message is not None
    assert "shape mismatch for 'decoder.layers.mlp.experts.experts.linear_fc" in message
    assert "checkpoint (" in message and "model (" in message


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    from megatron_elastic.training.checkpoint import CheckpointError, read_tracker, resolve_load_dir

    root = tmp_path / "ckpt"
    (root / "iter_0000003").mkdir(parents=True)
    (root / "iter_0000003" / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text("3\n")
    # A save of iteration 6 killed halfway leaves only its .partial directory.
    (root / "iter_0000006.partial").mkdir()
    assert read_tracker(root) == 3
    assert resolve_load_dir(root) == root / "iter_0000003"
    only_partial = tmp_path / "only_partial"
    (only_partial / "iter_0000002.partial").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_load_dir(only_partial)
    # Pointing at an iteration directory directly: only a finished save (with .metadata) loads.
    with pytest.raises(CheckpointError, match="incomplete save"):
        resolve_load_dir(root / "iter_0000003")
    with pytest.raises(CheckpointError, match="interrupted save"):
        resolve_load_dir(root / "iter_0000006.partial")
    (root / "iter_0000003" / ".metadata").write_text("")
    assert resolve_load_dir(root / "iter_0000003") == root / "iter_0000003"
    (root / "latest_checkpointed_iteration.txt").write_text("9\n")
    with pytest.raises(CheckpointError, match="iteration 9 but .* is missing"):
        read_tracker(root)
