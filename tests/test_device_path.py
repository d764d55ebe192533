"""One training path: the CPU run walks the GPU's Megatron calls, and the CPU twins keep the
contracts of what they stand in for, so a mistake that would break a GPU run breaks here too.

Finding 1: weights are initialised inside the RNG tracker's fork on every device, so the tracker
must be seeded through ``model_parallel_cuda_manual_seed`` (``parallel.initialize`` does it).
Finding 2: the dispatcher's split sizes are host copies that only become valid at Megatron's
sync point; reading them earlier raises on CPU as it would read stale sizes on GPU.
Finding 3: the hierarchical router loss and every logged aux loss are the same under any TP.
"""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, run_distributed, tiny_overrides, train_run

from megatron_elastic.device import policy

SMOKE = REPO / "configs" / "smoke.yaml"
# The CPU twins exist only where CUDA does not; multi-rank runs need a GPU per rank under NCCL.
cpu_twin = pytest.mark.skipif(policy().cuda, reason="tests the compat layer's CPU twin")
multi_rank = pytest.mark.skipif(policy().cuda and torch.cuda.device_count() < 4, reason="needs 4 GPUs")


# ---------------------------------------------------------------------- finding 1: RNG tracker
def _build_after_initialize(rank, world_size, overrides, seeded):
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model

    cfg = load_config(SMOKE, overrides)
    parallel.initialize(cfg)
    try:
        if not seeded:
            mcore_random.get_cuda_rng_tracker().reset()  # as if nothing had seeded it
        tracker_states = sorted(mcore_random.get_cuda_rng_tracker().get_states())
        try:
            model = build_model(cfg, vocab_size=500)
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            return {"states": tracker_states, "error": str(exc)}
        return {"states": tracker_states, "error": None,
                "cpu_init": model.config.use_cpu_initialization}
    finally:
        parallel.destroy()


def test_initialize_seeds_the_rng_tracker_and_build_forks_it(smoke_data, tmp_path):
    (out,) = run_distributed(_build_after_initialize, 1, tiny_overrides(smoke_data, tmp_path), True,
                             tmp_dir=tmp_path)
    assert out["error"] is None
    assert out["states"] == ["data-parallel-rng", "expert-parallel-rng", "model-parallel-rng"]
    assert out["cpu_init"] is False  # the GPU's initialisation path, on CPU too


@cpu_twin
def test_building_without_a_seeded_tracker_fails_as_on_gpu(smoke_data, tmp_path):
    (out,) = run_distributed(_build_after_initialize, 1, tiny_overrides(smoke_data, tmp_path), False,
                             tmp_dir=tmp_path)
    assert out["states"] == []
    assert out["error"] == "cuda rng state model-parallel-rng is not added"


@cpu_twin
def test_cpu_tracker_keeps_megatron_contract():
    from megatron_elastic.compat import CpuRNGStatesTracker

    tracker = CpuRNGStatesTracker()
    with pytest.raises(Exception, match="cuda rng state model-parallel-rng is not added"):
        with tracker.fork():
            pass
    tracker.add("model-parallel-rng", 7)
    with pytest.raises(Exception, match="seed 7 already exists"):
        tracker.add("other", 7)
    with pytest.raises(Exception, match="cuda rng state model-parallel-rng already exists"):
        tracker.add("model-parallel-rng", 8)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked state advances
    assert torch.equal(torch.get_rng_state(), before)  # the default state is untouched
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(7)))


@cpu_twin
def test_seed_offsets_match_megatron():
    """The CPU twin of model_parallel_cuda_manual_seed adds the states Megatron's adds: same
    names, same seeds (TP/EP offsets read from Megatron's own source)."""
    from pathlib import Path

    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_elastic import compat

    source = Path(mcore_random.__file__).read_text()  # the original, whatever is patched now
    assert "offset = seed + 2718" in source and "tensor_model_parallel_seed = offset + tp_rank" in source
    assert "expert_parallel_seed = seed + 1024 + 100 * ep_rank + etp_rank" in source
    compat.enable()
    mcore_random.model_parallel_cuda_manual_seed(10, tp_rank=1, ep_rank=2, etp_rank=1)
    states = mcore_random.get_cuda_rng_tracker().get_states()
    expected = {"data-parallel-rng": 10, "model-parallel-rng": 10 + 2718 + 1,
                "expert-parallel-rng": 10 + 1024 + 100 * 2 + 1}
    assert set(states) == set(expected)
    for name, seed in expected.items():
        assert torch.equal(states[name], torch.Generator().manual_seed(seed).get_state()), name


@cpu_twin
def test_pipeline_schedules_allocate_their_cuda_literal_on_cpu():
    """Megatron's schedules allocate their token counter with device="cuda" (a literal that
    torch.cuda.current_device cannot redirect); on CPU only that allocation moves."""
    from megatron.core.pipeline_parallel import schedules

    from megatron_elastic import compat

    compat.enable()
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device == torch.device("cpu")
    assert schedules.torch.zeros(2).dtype == torch.float32
    assert schedules.torch.autograd is torch.autograd and schedules.torch.ones is torch.ones


# ---------------------------------------------------------------------- finding 2: host copies
@cpu_twin
def test_host_copy_refuses_reads_before_its_event():
    from megatron_elastic import compat

    compat.enable()
    copy = compat._cpu_maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)
    for read in (copy.tolist, lambda: list(copy), lambda: copy[0], lambda: len(copy)):
        with pytest.raises(RuntimeError, match="before Megatron's cuda_sync_point"):
            read()
    event = torch.cuda.current_stream().record_event()
    with pytest.raises(RuntimeError):
        copy.tolist()
    event.synchronize()
    assert copy.tolist() == [3, 5] and sum(copy) == 8
    # Tensors Megatron keeps as tensors are left alone.
    t = torch.tensor([1])
    assert compat._cpu_maybe_move_tensor_to_cpu(t) is t


def _dispatch_ep2(rank, world_size, early_read):
    """One ElasticMoELayer forward under EP 2; optionally reads the split sizes before the sync
    point the way the dispatcher used to (inside token_dispatch, before Megatron's sync)."""
    from moe_builders import build_stack, make_cfg, make_input, reset_moe_globals

    from megatron_elastic import parallel
    from megatron_elastic.moe.dispatcher import ElasticAlltoAllTokenDispatcher

    cfg = make_cfg({"parallel.expert_model_parallel_size": 2, "model.num_layers": 1})
    parallel.initialize(cfg)
    original = ElasticAlltoAllTokenDispatcher.token_dispatch
    try:
        if early_read:
            def reads_too_early(self, tokens, probs):
                self._splits_as_lists()
                return original(self, tokens, probs)

            ElasticAlltoAllTokenDispatcher.token_dispatch = reads_too_early
        reset_moe_globals()
        layers = build_stack(cfg)
        x = make_input(rank)
        try:
            out = layers[0](x)[0]
        except RuntimeError as exc:
            return str(exc)
        return float(out.abs().sum())
    finally:
        ElasticAlltoAllTokenDispatcher.token_dispatch = original
        parallel.destroy()


@cpu_twin
@pytest.mark.multiproc
def test_reading_split_sizes_before_the_sync_point_fails_on_cpu(tmp_path):
    early = run_distributed(_dispatch_ep2, 2, True, tmp_dir=tmp_path)
    assert all(isinstance(r, str) and "cuda_sync_point" in r for r in early), early
    ok = run_distributed(_dispatch_ep2, 2, False, tmp_dir=tmp_path)
    assert all(isinstance(r, float) and r > 0 for r in ok), ok


# ---------------------------------------------------------------------- finding 3 + TP x EP
def _router_loss_grads(rank, world_size, overrides):
    """Gradient of the hierarchical router loss alone (LM loss x 0) w.r.t. each router weight,
    after Megatron's grad finalisation, plus the logged value."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.train import build
    from megatron_elastic.training.metrics import collect_moe_metrics

    cfg = load_config(SMOKE, overrides)
    try:
        env, tokenizer, chunks, ddp_chunks, optimizer, dp_rank, dp_size = build(cfg)
        (model,), (ddp,) = chunks, ddp_chunks  # one pipeline stage: one model chunk
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([1.0]))
        model.elastic_context.set(0, 0, 0)
        s = cfg.model.seq_length
        tokens = torch.randint(0, 500, (1, s), generator=torch.Generator().manual_seed(3))
        pos = torch.arange(s).unsqueeze(0)
        ddp.zero_grad_buffer()
        loss = ddp(tokens, pos, None, labels=tokens)
        (loss.float().mean() * 0.0).backward()
        finalize_model_grads([ddp])
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if "router" in n}
        return {"grads": grads, "log": collect_moe_metrics(1)}
    finally:
        parallel.destroy()


@multi_rank
@pytest.mark.multiproc
@pytest.mark.slow
def test_router_loss_gradient_and_log_do_not_scale_with_tp(smoke_data, tmp_path):
    common = {"elastic.router_loss_coeff": 0.5, "model.moe_aux_loss_coeff": 0.0,
              "train.micro_batch_size": 1, "train.global_batch_size": 1}
    tp1 = run_distributed(_router_loss_grads, 1, tiny_overrides(smoke_data, tmp_path, **common),
                          tmp_dir=tmp_path)[0]
    tp2 = run_distributed(_router_loss_grads, 2, tiny_overrides(
        smoke_data, tmp_path, **common, **{"parallel.tensor_model_parallel_size": 2,
                                           "parallel.sequence_parallel": "true"}), tmp_dir=tmp_path)
    for name, ref in tp1["grads"].items():
        assert ref.abs().sum() > 0, name
        for rank in tp2:
            torch.testing.assert_close(rank["grads"][name], ref, rtol=1e-5, atol=1e-8)
    for rank in tp2:
        assert rank["log"]["hierarchical_router_loss"] == pytest.approx(
            tp1["log"]["hierarchical_router_loss"], rel=1e-5)


@multi_rank
@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fixed", "layerwise_pool"])
def test_tp2_sp_x_ep2_matches_one_rank(smoke_data, tmp_path, recipe):
    """4 gloo ranks, TP 2 (sequence parallel) x EP 2 (DP 2) == 1 rank, 3 steps, same data/weights.

    Fixed k, and layer-wise k with a candidate pool and the router loss drawn per iteration
    (schedule ``batch``), so the draws do not depend on how micro-batches are spread over DP."""
    extra = {"train.train_iters": 3, "model.moe_aux_loss_coeff": 1e-2}
    if recipe == "layerwise_pool":
        extra.update({"elastic.schedule": "batch", "elastic.k_min": 1, "elastic.k_max": 2,
                      "elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 0.1})
    single = run_distributed(train_run, 1, tiny_overrides(smoke_data, tmp_path, **extra), tmp_dir=tmp_path)[0]
    layout = {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": "true",
              "parallel.expert_model_parallel_size": 2}
    ranks = run_distributed(train_run, 4, tiny_overrides(smoke_data, tmp_path, **extra, **layout),
                            tmp_dir=tmp_path)
    single = single["losses"]
    assert len(single) == 3 and single[0] != single[-1]
    for rank in ranks:
        assert rank["losses"] == pytest.approx(single, abs=1e-5)


def test_only_the_device_policy_and_compat_look_for_cuda():
    offenders = []
    for path in (REPO / "megatron_elastic").rglob("*.py"):
        if path.name in ("device.py", "compat.py"):
            continue
        if "cuda.is_available" in path.read_text():
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """tools/gpu_check.sh --dry-run runs every step of the GPU check on CPU at toy size."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "check")],
                          cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ,
                                                                        "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "check" / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"]
    assert list(summary["steps"]) == ["data", "tests", "train_bf16", "train_fp32", "bench", "bench_train"]
    assert summary["throughput"]["tokens_per_s"] > 0 and summary["throughput"]["tflops_per_device"] > 0
    assert summary["steps"]["train_fp32"]["max_rel_diff"] == 0.0  # both fp32 on CPU: identical
    assert {c["case"] for c in summary["steps"]["bench"]["cases"]} >= {"mcore_topk2", "elastic_fixed2"}
    assert {c["case"] for c in summary["steps"]["bench_train"]["cases"]} >= {"stock_top2", "mmoe_layerwise[1,4]"}
    assert "overall: PASSED" in (tmp_path / "check" / "summary.txt").read_text()


# ---------------------------------------------------------------------- finding 5: top-p
def test_top_p_schedule_with_a_pool_is_refused():
    from megatron_elastic.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="does not combine with elastic.pool_ratio"):
        load_config(SMOKE, ["elastic.schedule=top_p", "elastic.top_p=0.5", "elastic.pool_ratio=2.0"])


@cpu_twin
def test_inference_top_p_has_its_own_k_range_and_leaves_no_sync_point_behind():
    """A fixed-k (k=2) layer evaluated with top-p takes per-token k in [1, num_experts] (so it
    can go above 2), without a host sync of the mean k; the next fixed-k forward uses
    Megatron's own sync point again (a top-p forward used to move it for good)."""
    from moe_builders import build_stack, make_cfg, make_input, reset_moe_globals

    from megatron_elastic import parallel
    from megatron_elastic.moe.control import set_inference_k

    cfg = make_cfg({"model.init_method_std": 0.5})
    parallel.initialize(cfg)
    try:
        reset_moe_globals()
        layers = build_stack(cfg)
        layers.eval()
        router, dispatcher = layers[0].router, layers[0].token_dispatcher
        router.record_routing = True
        with torch.no_grad():
            layers[0](make_input(1))
            fixed_point = dispatcher.cuda_sync_point
            set_inference_k(layers, top_p=0.99)
            layers[0](make_input(1))
            per_token = router.last_routing_map.sum(-1)
            assert torch.is_tensor(router.last_mean_k)  # stays on the device
            assert dispatcher.cuda_sync_point == "before_permutation_1"
            assert per_token.max() > 2 and per_token.min() >= 1
            set_inference_k(layers, top_p=0.99, top_p_k_range=(2, 3))
            layers[0](make_input(1))
            per_token = router.last_routing_map.sum(-1)
            assert per_token.min() >= 2 and per_token.max() <= 3
            set_inference_k(layers, None)
            layers[0](make_input(1))
            assert router.last_k == 2 and dispatcher.cuda_sync_point == fixed_point
        with pytest.raises(ValueError, match=r"top-p k range \[0, 3\]"):
            set_inference_k(layers, top_p=0.5, top_p_k_range=(0, 3))
    finally:
        parallel.destroy()
