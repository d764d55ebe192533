"""Single-process tests of the elastic MoE layer (router + all-to-all dispatcher) on Megatron-core.

Everything runs the real Megatron-core code under the CPU compat layer, in this process, with a
world of one (expert-parallel size 1). The multi-process expert-parallel checks live in
``test_elastic_moe_dist.py``, which reuses the builders defined here.

What is checked (GitHub issue 3, "Must show"):

* equivalence: at a fixed k the elastic router + dispatcher are Megatron's ``TopKRouter`` +
  ``MoEAlltoAllTokenDispatcher`` (same weights -> same outputs and gradients, aux/z losses
  included); at a step k_l below ``moe_router_topk`` the elastic layer equals a plain Megatron
  layer built with ``moe_router_topk = k_l``; the custom routing path (candidate pool, top-p)
  reduces to Megatron's top-k when the pool / threshold are degenerate;
* router behaviour in a full ``GPTModel`` forward: k per layer from the sampler, candidate-pool
  selections inside each token's top k_ideal with exactly k_l experts, per-token top-p k, the
  evaluation k from ``set_inference_k`` and its defaults;
* losses: load-balancing loss at the step's k equals Megatron's ``switch_load_balancing_loss_func``
  at that k; the hierarchical router loss value and its gradient (coeff x d/dlogits);
* dispatcher sizing: dropless output rows = tokens x k_l, capacity from tokens x k_l.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import pytest
import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_capacity,
    get_moe_layer_wise_logging_tracker,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import build_module

from megatron_elastic import parallel
from megatron_elastic.config import Config
from megatron_elastic.models.gpt import build_model, init_weights, layer_spec, transformer_config
from megatron_elastic.moe.control import inference_k, set_inference_k
from megatron_elastic.moe.dispatcher import ElasticAlltoAllTokenDispatcher
from megatron_elastic.moe.layer import ElasticMoELayer, attach_elastic
from megatron_elastic.moe.router import ElasticRouter, elastic_routers
from megatron_elastic.moe.routing_math import candidate_pool_size
from megatron_elastic.moe.schedules import KSampler, top_p_k

# These run Megatron-core on the CPU through the compat layer (and gloo for the EP workers). With
# CUDA present the compat layer stands down, Megatron allocates on the GPU and the spawned EP
# workers would need a GPU each: skip rather than half-run.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo compat-layer tests")

# ---------------------------------------------------------------------- shared builders
# (also imported by test_elastic_moe_dist.py, whose spawned workers need them importable)

SEQ, BATCH, HIDDEN = 8, 2, 16

BASE = {
    "model.num_layers": 1,
    "model.hidden_size": HIDDEN,
    "model.num_attention_heads": 2,
    "model.num_query_groups": 1,
    "model.seq_length": SEQ,
    "model.num_moe_experts": 8,
    "model.moe_ffn_hidden_size": 16,
    "model.moe_router_topk": 2,
    "model.moe_aux_loss_coeff": 0.01,
    "model.vocab_size": 64,
    "train.bf16": False,
    "train.micro_batch_size": BATCH,
    "train.global_batch_size": 8 * BATCH,
    "train.seed": 1234,
    "elastic.seed": 77,
}


def make_cfg(overrides: Optional[dict] = None) -> Config:
    values = dict(BASE)
    values.update(overrides or {})
    items = [f"{k}={'null' if v is None else v}" for k, v in values.items()]
    return Config().apply_overrides(items).validate()


def moe_spec(cfg: Config, plain: bool = False):
    """The MoE spec the model uses; ``plain`` swaps in Megatron-core's MoELayer + TopKRouter."""
    spec = copy.deepcopy(layer_spec(cfg, use_te=False).submodules.mlp)
    if plain:
        spec.module = MoELayer
        spec.submodules.router = TopKRouter
    return spec


def build_stack(cfg: Config, plain: bool = False, topk: Optional[int] = None) -> torch.nn.ModuleList:
    """``cfg.model.num_layers`` MoE layers (layer numbers 1..L) with layout-independent weights.

    ``topk`` overrides ``moe_router_topk`` after TransformerConfig validation: Megatron refuses
    topk=1 with a plain (post-top-k) softmax, a configuration the elastic router reaches at k_l=1.
    """
    tcfg = transformer_config(cfg)
    if topk is not None:
        tcfg.moe_router_topk = topk
    spec = moe_spec(cfg, plain)
    layers = torch.nn.ModuleList()
    for i in range(cfg.model.num_layers):
        layer = build_module(spec, config=tcfg)
        layer.set_layer_number(i + 1)
        layers.append(layer)
    if not plain:
        attach_elastic(layers, cfg)
    init_weights(layers, cfg)  # keyed by global parameter name: same weights for any EP layout
    return layers


def run_stack(layers, x: torch.Tensor) -> torch.Tensor:
    """Residual stack of MoE layers: h <- h + moe(h)."""
    h = x
    for layer in layers:
        out, bias = layer(h)
        assert bias is None
        h = h + out
    return h


def make_input(seed: int, seq: int = SEQ, batch: int = BATCH, hidden: int = HIDDEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(seq, batch, hidden, generator=g)


def loss_weights(seed: int, seq: int = SEQ, batch: int = BATCH, hidden: int = HIDDEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(seq, batch, hidden, generator=g)


def expert_global_grads(layers) -> Dict[str, torch.Tensor]:
    """Expert weight grads keyed by (layer, global expert index, weight name)."""
    out = {}
    for li, layer in enumerate(layers):
        for local, expert in enumerate(layer.experts.local_experts):
            g_idx = layer.local_expert_indices[local]
            for pname, p in expert.named_parameters():
                out[f"{li}.{g_idx}.{pname}"] = p.grad.detach().clone()
    return out


def forward_backward(layers, x: torch.Tensor, w: torch.Tensor) -> dict:
    """One forward + backward of ``sum(w * stack(x))`` (+ the attached aux losses)."""
    layers.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = run_stack(layers, x)
    (out * w).sum().backward()
    return {
        "out": out.detach().clone(),
        "x_grad": x.grad.detach().clone(),
        "router_grads": [layer.router.weight.grad.detach().clone() for layer in layers],
        "expert_grads": expert_global_grads(layers),
        "last_k": [getattr(layer.router, "last_k", None) for layer in layers],
    }


def capture_router_inputs(layers) -> List[list]:
    """Forward pre-hooks that store each router's input (to recompute the logits by hand)."""
    store: List[list] = [[] for _ in layers]
    for i, layer in enumerate(layers):
        layer.router.register_forward_pre_hook(lambda mod, args, i=i: store[i].append(args[0].detach()))
    return store


def router_logits(router, x: torch.Tensor) -> torch.Tensor:
    return (x.reshape(-1, x.shape[-1]).float() @ router.weight.detach().float().t())


def reset_moe_globals() -> None:
    """Megatron keeps the aux-loss tracker and the aux-loss grad scale as process globals."""
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))


def close(a, b, atol=1e-5, rtol=1e-5, msg=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def close_rel(a: torch.Tensor, b: torch.Tensor, rel: float, msg: str = "") -> None:
    """max|a - b| <= rel * max|b|: a tolerance that scales with the tensor (router grads are
    ~1e-3, outputs ~1), so a fixed atol can be neither too loose nor too tight."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{msg}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= rel * scale + 1e-12, f"{msg}: max abs diff {err:.3e} > {rel:g} x max|ref| {scale:.3e}"


def assert_runs_equal(got: dict, ref: dict, rel: float = 1e-5, tag: str = "") -> None:
    close_rel(got["out"], ref["out"], rel, f"{tag} outputs")
    close_rel(got["x_grad"], ref["x_grad"], rel, f"{tag} input grads")
    for i, (a, b) in enumerate(zip(got["router_grads"], ref["router_grads"])):
        assert float(b.abs().max()) > 0, f"{tag} router {i} got no gradient"
        close_rel(a, b, rel, f"{tag} router {i} grads")
    assert got["expert_grads"].keys() == ref["expert_grads"].keys()
    for name in got["expert_grads"]:
        close_rel(got["expert_grads"][name], ref["expert_grads"][name], rel, f"{tag} expert grad {name}")


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def single_process():
    """World of one: TP = EP = 1 over gloo, torn down at the end of the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a shared 2-core box
    parallel.destroy()
    parallel.initialize(make_cfg())
    yield
    reset_moe_globals()
    parallel.destroy()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_moe_globals():
    reset_moe_globals()
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------- 1. equivalence
EQUIV_CASES = {
    "softmax_k2": {},
    "softmax_k1": {"model.moe_router_topk": 1, "model.moe_router_pre_softmax": True},
    "softmax_k3_zloss": {"model.moe_router_topk": 3, "model.moe_z_loss_coeff": 1e-3},
    "pre_softmax": {"model.moe_router_pre_softmax": True},
    "sigmoid_k2": {"model.moe_router_score_function": "sigmoid"},
    "capacity_drop": {"model.moe_expert_capacity_factor": 1.0},
    "capacity_pad": {"model.moe_expert_capacity_factor": 1.0, "model.moe_pad_expert_input_to_capacity": True},
}


@pytest.mark.parametrize("case", list(EQUIV_CASES))
def test_fixed_k_matches_megatron_topk_router_and_alltoall_dispatcher(case):
    cfg = make_cfg({"model.num_layers": 2, **EQUIV_CASES[case]})
    elastic = build_stack(cfg)
    plain = build_stack(cfg, plain=True)
    assert isinstance(elastic[0], ElasticMoELayer) and isinstance(elastic[0].router, ElasticRouter)
    assert isinstance(elastic[0].token_dispatcher, ElasticAlltoAllTokenDispatcher)
    assert type(plain[0]) is MoELayer and type(plain[0].router) is TopKRouter
    assert type(plain[0].token_dispatcher) is MoEAlltoAllTokenDispatcher
    plain.load_state_dict(elastic.state_dict())
    for mode in ("train", "eval"):
        elastic.train(mode == "train")
        plain.train(mode == "train")
        for step in range(2):
            elastic.elastic_context.set(step, 0, 0)
            x, w = make_input(step), loss_weights(step)
            reset_moe_globals()
            got = forward_backward(elastic, x, w)
            tracked = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
            reset_moe_globals()
            ref = forward_backward(plain, x, w)
            ref_tracked = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
            assert_runs_equal(got, ref, rel=1e-6, tag=f"{case} {mode} step {step}")
            assert got["last_k"] == [cfg.model.moe_router_topk] * 2
            assert tracked.keys() == ref_tracked.keys()
            for name in ref_tracked:
                close(tracked[name], ref_tracked[name], 1e-7, 1e-6, name)
            if mode == "train":
                assert "load_balancing_loss" in ref_tracked
                if cfg.model.moe_z_loss_coeff:
                    assert "z_loss" in ref_tracked


@pytest.mark.parametrize("k_l", [1, 2, 3])
@pytest.mark.parametrize("capacity", [None, "drop", "pad"])
def test_step_k_matches_megatron_layer_built_with_that_topk(k_l, capacity):
    """k_l < moe_router_topk = k_max: the elastic layer is Megatron's layer built at topk = k_l."""
    extra = {}
    if capacity is not None:
        extra["model.moe_expert_capacity_factor"] = 1.0
        extra["model.moe_pad_expert_input_to_capacity"] = capacity == "pad"
    cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4, **extra})
    assert transformer_config(cfg).moe_router_topk == 4
    elastic = build_stack(cfg)
    router = elastic[0].router
    router.sampler = KSampler("fixed", 1, 4, fixed_k=k_l)
    plain = build_stack(cfg, plain=True, topk=k_l)
    plain.load_state_dict(elastic.state_dict())
    elastic.train()
    plain.train()
    x, w = make_input(3), loss_weights(3)
    got = forward_backward(elastic, x, w)
    ref = forward_backward(plain, x, w)
    assert_runs_equal(got, ref, rel=1e-6)
    assert got["last_k"] == [k_l]


@pytest.mark.parametrize("route", ["pool_ratio_1", "top_p_clipped"])
def test_custom_routing_path_reduces_to_megatron_topk(route):
    """The candidate-pool and top-p code paths (not Megatron's routing) give Megatron's top-k
    outputs, gradients and logged losses when the pool is the top-k (pool_ratio=1) or the top-p
    threshold is clipped to k_min = k_max = k."""
    k = 2
    if route == "pool_ratio_1":
        over = {"elastic.pool_ratio": 1.0}
    else:
        over = {"elastic.schedule": "top_p", "elastic.top_p": 0.3, "elastic.k_min": k, "elastic.k_max": k}
    cfg = make_cfg({"model.moe_router_topk": k, "model.moe_z_loss_coeff": 1e-3, **over})
    elastic = build_stack(cfg)
    plain = build_stack(cfg, plain=True)
    plain.load_state_dict(elastic.state_dict())
    elastic.train()
    plain.train()
    x, w = make_input(5), loss_weights(5)
    got = forward_backward(elastic, x, w)
    tracked = {k_: v["values"].clone() for k_, v in get_moe_layer_wise_logging_tracker().items()}
    reset_moe_globals()
    ref = forward_backward(plain, x, w)
    ref_tracked = {k_: v["values"].clone() for k_, v in get_moe_layer_wise_logging_tracker().items()}
    assert_runs_equal(got, ref, rel=1e-5)
    for name in ("load_balancing_loss", "z_loss"):
        close(tracked[name], ref_tracked[name], 1e-7, 1e-6, name)
    assert elastic[0].router.last_mean_k == k
    if route == "top_p_clipped":
        assert got["last_k"] == [None]  # decided per token...
        assert int(elastic[0].token_dispatcher.num_out_tokens) == SEQ * BATCH * k  # ...all at k


# ---------------------------------------------------------------------- 2. router in a model
VOCAB = 64


def _model(over: dict):
    cfg = make_cfg({"model.num_layers": 2, **over})
    model = build_model(cfg, VOCAB)
    return cfg, model


def _model_forward(model, it: int, mb: int = 0, offset: int = 0, tokens: Optional[torch.Tensor] = None):
    if tokens is None:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + it))
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    model.elastic_context.set(it, mb, offset)
    with torch.no_grad() if not model.training else torch.enable_grad():
        return model(tokens, pos, None)


def _routers(model) -> List[ElasticRouter]:
    routers = sorted(elastic_routers(model), key=lambda r: r.layer_number)
    for r in routers:
        r.record_routing = True
    return routers


def test_training_k_per_layer_comes_from_sampler():
    cfg, model = _model({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4})
    routers = _routers(model)
    sampler = routers[0].sampler
    assert all(r.sampler is sampler for r in routers)
    model.train()
    seen = set()
    differs = False
    for it in range(6):
        for mb in range(2):
            _model_forward(model, it, mb)
            ks = [r.last_k for r in routers]
            assert ks == [sampler.k_for(it, mb, r.layer_number - 1) for r in routers]
            for r, k in zip(routers, ks):
                assert (r.last_routing_map.sum(-1) == k).all()
                assert r.last_routing_map.shape == (SEQ * BATCH, 8)
                assert r.last_mean_k == k
            seen.update(ks)
            differs |= ks[0] != ks[1]
    assert len(seen) >= 3 and differs, "schedule did not vary k across steps/layers"


def test_candidate_pool_selects_k_of_top_k_ideal():
    cfg, model = _model({
        "elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 3, "elastic.pool_ratio": 2.0,
    })
    routers = _routers(model)
    inputs = capture_router_inputs([r_layer.mlp for r_layer in model.decoder.layers])
    model.train()
    outside_topk = 0
    maps = {}
    for it in range(4):
        _model_forward(model, it)
        for li, r in enumerate(routers):
            k = r.last_k
            assert k == r.sampler.k_for(it, 0, li)
            k_ideal = candidate_pool_size(k, 2.0, 8)
            assert k_ideal == min(8, 2 * k)
            probs = torch.softmax(router_logits(r, inputs[li][-1]), dim=-1)
            rmap = r.last_routing_map
            assert (rmap.sum(-1) == k).all()
            pool = torch.zeros_like(rmap).scatter(1, probs.topk(k_ideal, dim=-1).indices, True)
            assert not (rmap & ~pool).any(), "an expert outside the token's top k_ideal was selected"
            topk = torch.zeros_like(rmap).scatter(1, probs.topk(k, dim=-1).indices, True)
            outside_topk += int((rmap & ~topk).any(-1).sum())
            maps[(it, li)] = rmap.clone()
    assert outside_topk > 0, "the pool never picked anything but the plain top-k"
    # Same coordinates -> same draw (stateless, resumable).
    _model_forward(model, 2)
    assert all(torch.equal(r.last_routing_map, maps[(2, li)]) for li, r in enumerate(routers))


def test_candidate_pool_draw_is_keyed_by_global_token_id():
    """Sample 1 of a two-sample batch at offset 0 routes like the same sample alone at offset 1."""
    cfg, model = _model({"elastic.schedule": "fixed", "model.moe_router_topk": 2, "elastic.pool_ratio": 3.0})
    routers = _routers(model)
    model.train()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(9))
    _model_forward(model, 5, 0, 0, tokens)
    both = [r.last_routing_map.view(SEQ, 2, -1)[:, 1].clone() for r in routers]
    _model_forward(model, 5, 0, 1, tokens[1:])
    alone = [r.last_routing_map.view(SEQ, 1, -1)[:, 0].clone() for r in routers]
    for a, b in zip(both, alone):
        assert torch.equal(a, b)
    # ...and a different offset (another global token) draws differently.
    _model_forward(model, 5, 0, 7, tokens[1:])
    other = [r.last_routing_map.view(SEQ, 1, -1)[:, 0].clone() for r in routers]
    assert any(not torch.equal(a, b) for a, b in zip(alone, other))


def _check_top_p(routers, inputs, p, k_min, k_max):
    for li, r in enumerate(routers):
        probs = torch.softmax(router_logits(r, inputs[li][-1]), dim=-1)
        k_tok = top_p_k(probs, p, k_min, k_max)
        rmap = r.last_routing_map
        assert torch.equal(rmap.sum(-1), k_tok)
        # the k_t selected experts are each token's k_t most probable ones
        order = probs.argsort(dim=-1, descending=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(8).expand_as(order))
        assert torch.equal(rmap, ranks < k_tok.unsqueeze(1))
        assert r.last_k is None
        assert r.last_mean_k == pytest.approx(float(k_tok.float().mean()))
    return k_tok


def test_top_p_training_per_token_k():
    cfg, model = _model({
        "elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1, "elastic.k_max": 4,
        "model.init_method_std": 0.2,
    })
    routers = _routers(model)
    inputs = capture_router_inputs([layer.mlp for layer in model.decoder.layers])
    model.train()
    _model_forward(model, 0)
    k_tok = _check_top_p(routers, inputs, 0.5, 1, 4)
    assert len(set(k_tok.tolist())) > 1, "top-p did not vary k across tokens"
    disp = model.decoder.layers[-1].mlp.token_dispatcher
    assert int(disp.num_out_tokens) == int(k_tok.sum()) == disp.last_dispatch_rows


def test_eval_k_from_set_inference_k_and_defaults():
    cfg, model = _model({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                         "elastic.pool_ratio": 2.0, "model.init_method_std": 0.5})
    routers = _routers(model)
    inputs = capture_router_inputs([layer.mlp for layer in model.decoder.layers])
    model.eval()

    def check_topk(ks):
        for li, (r, k) in enumerate(zip(routers, ks)):
            assert r.last_k == k
            probs = torch.softmax(router_logits(r, inputs[li][-1]), dim=-1)
            expect = torch.zeros_like(r.last_routing_map).scatter(1, probs.topk(k, dim=-1).indices, True)
            assert torch.equal(r.last_routing_map, expect), "eval must route to the plain top-k (no pool)"

    # Default for a varying schedule: k_max everywhere.
    assert inference_k(model) == [4, 4]
    _model_forward(model, 0)
    check_topk([4, 4])
    set_inference_k(model, 3)
    assert inference_k(model) == [3, 3]
    _model_forward(model, 1)
    check_topk([3, 3])
    set_inference_k(model, [1, 4])
    assert inference_k(model) == [1, 4]
    _model_forward(model, 2)
    check_topk([1, 4])
    set_inference_k(model, top_p=0.5)
    assert inference_k(model) == [None, None]
    _model_forward(model, 3)
    _check_top_p(routers, inputs, 0.5, 1, 4)
    # Training forwards ignore the inference setting.
    model.train()
    _model_forward(model, 4)
    assert [r.last_k for r in routers] == [routers[0].sampler.k_for(4, 0, i) for i in range(2)]
    model.eval()
    set_inference_k(model, None)
    _model_forward(model, 5)
    check_topk([4, 4])
    with pytest.raises(ValueError):
        set_inference_k(model, [1, 2, 3])
    with pytest.raises(ValueError):
        set_inference_k(model, 9)


def test_eval_default_is_training_k_for_fixed_schedule_and_config_eval_k():
    cfg, model = _model({"elastic.schedule": "fixed", "model.moe_router_topk": 3})
    routers = _routers(model)
    assert inference_k(model) == [3, 3]
    model.eval()
    _model_forward(model, 0)
    assert [r.last_k for r in routers] == [3, 3]
    # fixed with an explicit k_min == k_max != model.moe_router_topk (a valid config; used to
    # raise "fixed_k=2 outside [k_min, k_max]=[3, 3]" in attach_elastic): trains and evals at 3.
    cfg, model = _model({"elastic.schedule": "fixed", "model.moe_router_topk": 2,
                         "elastic.k_min": 3, "elastic.k_max": 3})
    routers = _routers(model)
    assert inference_k(model) == [3, 3]
    model.train()
    _model_forward(model, 0)
    assert [r.last_k for r in routers] == [3, 3]
    model.eval()
    _model_forward(model, 1)
    assert [r.last_k for r in routers] == [3, 3]
    cfg, model = _model({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                         "elastic.eval_k": "[2, 1]"})
    routers = _routers(model)
    assert inference_k(model) == [2, 1]
    model.eval()
    _model_forward(model, 0)
    assert [r.last_k for r in routers] == [2, 1]


# ---------------------------------------------------------------------- 3. losses
def _lb_reference(logits, rmap, k, coeff, n):
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=rmap.sum(0), total_num_tokens=logits.shape[0], topk=k,
        num_experts=n, moe_aux_loss_coeff=coeff,
    ) / coeff


@pytest.mark.parametrize("pool", [None, 2.0])
def test_load_balancing_and_router_loss_values_at_variable_k(pool):
    coeff, lam, n = 0.01, 0.5, 8
    cfg = make_cfg({"model.num_layers": 2, "elastic.schedule": "layerwise", "elastic.k_min": 1,
                    "elastic.k_max": 4, "elastic.pool_ratio": pool, "elastic.router_loss_coeff": lam,
                    "model.moe_aux_loss_coeff": coeff, "model.init_method_std": 0.3})
    layers = build_stack(cfg)
    routers = [layer.router for layer in layers]
    for r in routers:
        r.record_routing = True
    inputs = capture_router_inputs(layers)
    layers.train()
    ks_seen = set()
    for it in range(5):
        layers.elastic_context.set(it, 0, 0)
        reset_moe_globals()
        forward_backward(layers, make_input(it), loss_weights(it))
        tracker = get_moe_layer_wise_logging_tracker()
        for li, r in enumerate(routers):
            k = r.last_k
            ks_seen.add(k)
            logits = router_logits(r, inputs[li][-1])
            if pool is None:
                rmap = torch.zeros(logits.shape, dtype=torch.bool).scatter(1, logits.topk(k, dim=-1).indices, True)
                assert torch.equal(rmap, r.last_routing_map)
            else:
                rmap = r.last_routing_map  # the sampled experts are what gets balanced
            expect = _lb_reference(logits, rmap, k, coeff, n)
            got = tracker["load_balancing_loss"]["values"][li]
            close(got, expect, 1e-6, 1e-5, f"LB loss layer {li} at k={k}")
            if k != 4:  # normalising by moe_router_topk=k_max would have been visibly wrong
                assert not torch.isclose(got, _lb_reference(logits, rmap, 4, coeff, n), rtol=1e-3)
            p = torch.softmax(logits, dim=-1)
            h_minus_log_n = (-(p * p.log()).sum(-1) - math.log(n)).mean()
            close(tracker["hierarchical_router_loss"]["values"][li], h_minus_log_n, 1e-6, 1e-5,
                  f"hierarchical router loss layer {li}")
            assert -math.log(n) <= float(h_minus_log_n) <= 0
    assert len(ks_seen) >= 3


def test_router_loss_gradient_is_coeff_times_direct_gradient():
    lam = 0.7
    cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                    "elastic.router_loss_coeff": lam, "model.init_method_std": 0.3})
    layers = build_stack(cfg)
    router = layers[0].router
    layers.train()
    layers.elastic_context.set(3, 1, 0)
    x, w = make_input(11), loss_weights(11)
    with_loss = forward_backward(layers, x, w)
    router.router_loss_coeff = 0.0
    without = forward_backward(layers, x, w)
    assert with_loss["last_k"] == without["last_k"]
    close(with_loss["out"], without["out"], 0, 0, "the router loss must not change the forward")

    # Direct formula: mean_t(H(p_t) - log N), p = softmax(x W^T); autograd w.r.t. W and x.
    xd = x.detach().clone().requires_grad_(True)
    wd = router.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(xd.reshape(-1, HIDDEN) @ wd.t(), dim=-1)
    direct = (-(p * p.log()).sum(-1) - math.log(8)).mean()
    gw, gx = torch.autograd.grad(direct, [wd, xd])
    close(with_loss["router_grads"][0] - without["router_grads"][0], lam * gw, 1e-6, 1e-4, "router weight grad")
    close(with_loss["x_grad"] - without["x_grad"], lam * gx, 1e-6, 1e-4, "input grad")
    assert float(gw.abs().max()) > 1e-4  # the check is not vacuous
    # Expert weights do not see the router loss.
    for name in with_loss["expert_grads"]:
        close(with_loss["expert_grads"][name], without["expert_grads"][name], 1e-7, 1e-5, name)


# ---------------------------------------------------------------------- 6. dispatcher sizing
@pytest.mark.parametrize("k_l", [1, 2, 3, 4])
def test_dropless_dispatch_is_sized_to_step_k(k_l):
    cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4})
    layers = build_stack(cfg)
    layer = layers[0]
    layer.router.sampler = KSampler("fixed", 1, 4, fixed_k=k_l)
    layers.train()
    forward_backward(layers, make_input(1), loss_weights(1))
    disp = layer.token_dispatcher
    tokens = SEQ * BATCH
    assert layer.config.moe_router_topk == 4  # what Megatron's dispatcher would size by
    assert disp.step_topk == k_l
    assert disp.num_out_tokens == tokens * k_l
    assert disp.last_dispatch_rows == tokens * k_l
    assert disp.last_dispatch_bytes == tokens * k_l * HIDDEN * 4


@pytest.mark.parametrize("k_l", [1, 2, 3])
def test_capacity_is_computed_from_step_k(k_l):
    cf, n = 1.0, 8
    tokens = SEQ * BATCH
    for pad in (False, True):
        cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                        "model.moe_expert_capacity_factor": cf,
                        "model.moe_pad_expert_input_to_capacity": pad})
        layers = build_stack(cfg)
        layer = layers[0]
        layer.router.sampler = KSampler("fixed", 1, 4, fixed_k=k_l)
        layer.router.record_routing = True
        layers.train()
        forward_backward(layers, make_input(2), loss_weights(2))
        disp = layer.token_dispatcher
        cap = get_capacity(num_tokens=tokens * k_l, num_experts=n, capacity_factor=cf)
        assert cap != get_capacity(num_tokens=tokens * 4, num_experts=n, capacity_factor=cf)
        per_expert = layer.router.last_routing_map.sum(0)
        assert int(per_expert.max()) <= cap
        if pad:
            assert disp.capacity == cap
            assert disp.num_out_tokens == cap * n == disp.last_dispatch_rows
            assert (per_expert == cap).all()
        else:
            assert int(disp.num_out_tokens) == int(per_expert.sum()) == disp.last_dispatch_rows


def test_top_p_with_padded_capacity_uses_routers_capacity():
    """Per-token k + drop-and-pad: router and dispatcher agree on one capacity, sized from the
    static bound moe_router_topk (the mean k is rank-local, padded buffers must not be), whatever
    the capacity factor. (Before the fix the dispatcher guessed k from the padded map and, for
    cf != 1, used another capacity than the router: cf=0.5 silently dropped half the tokens.)"""
    n = 8
    tokens = SEQ * BATCH
    for cf in (0.5, 1.0, 1.5):
        cfg = make_cfg({"elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1,
                        "elastic.k_max": 4, "model.moe_expert_capacity_factor": cf,
                        "model.moe_pad_expert_input_to_capacity": True, "model.init_method_std": 0.2})
        layers = build_stack(cfg)
        layer = layers[0]
        layer.router.record_routing = True
        inputs = capture_router_inputs(layers)
        layers.train()
        got = forward_backward(layers, make_input(4), loss_weights(4))
        r = layer.router
        assert r.last_k is None and r.last_mean_k < 4
        cap = get_capacity(num_tokens=tokens * 4, num_experts=n, capacity_factor=cf)
        assert (r.last_routing_map.sum(0) == cap).all()
        assert layer.token_dispatcher.capacity == cap, f"cf={cf}"
        # Output: each token's kept experts, gated by the router's probs (reference by hand).
        x = make_input(4)
        with torch.no_grad():
            probs, rmap = r.routing(router_logits(r, inputs[0][-1]).view(SEQ, BATCH, n))
            ref = torch.zeros(tokens, HIDDEN)
            flat = x.reshape(-1, HIDDEN)
            for e, expert in enumerate(layer.experts.local_experts):
                sel = rmap[:, e]
                if sel.any():
                    y, _ = expert(flat[sel], probs[sel, e])
                    ref[sel] += y
        close(got["out"].reshape(-1, HIDDEN), (flat + ref), 1e-6, 1e-5, f"cf={cf}")


class _FakeTPGroup:
    """Stands in for a tensor-parallel group of ``size`` ranks as seen from ``rank``."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_pool_token_ids_under_sequence_parallel_match_tp1():
    """With TP > 1 (sequence parallel) a router sees the tp_rank-th chunk of the sequence; its
    global token ids, hence its pool draws, must be those of the same tokens in a TP = 1 run
    (before the fix both TP ranks reused ids 0..S/tp-1 for different tokens)."""
    cfg = make_cfg({"model.moe_router_topk": 2, "elastic.pool_ratio": 3.0})
    layers = build_stack(cfg)
    router = layers[0].router
    router.train()
    router.context.set(4, 0, 6)
    logits = torch.randn(SEQ, BATCH, 8, generator=torch.Generator().manual_seed(3))
    full_ids = router._token_ids(SEQ, BATCH, "cpu").view(SEQ, BATCH)
    _, full_map = router.routing(logits)
    full_map = full_map.view(SEQ, BATCH, 8)
    assert torch.equal(full_ids, (torch.arange(BATCH) + 6) * SEQ + torch.arange(SEQ).unsqueeze(1))

    router.config = copy.copy(router.config)
    router.config.sequence_parallel = True
    real_group = router.tp_group
    try:
        for tp in (2, 4):
            chunk = SEQ // tp
            ids, maps = [], []
            for rank in range(tp):
                router.tp_group = _FakeTPGroup(rank, tp)
                ids.append(router._token_ids(chunk, BATCH, "cpu").view(chunk, BATCH))
                _, m = router.routing(logits[rank * chunk:(rank + 1) * chunk])
                maps.append(m.view(chunk, BATCH, 8))
            assert torch.equal(torch.cat(ids), full_ids), f"tp={tp}"
            assert torch.equal(torch.cat(maps), full_map), f"tp={tp}"
    finally:
        router.tp_group = real_group
