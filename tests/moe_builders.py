"""Shared builders for the MoE tests (tests/moe/): tiny configs, stacks of MoE layers with
layout-independent weights, a small GPT model, inputs, comparison helpers, and the fixtures that
give a test module a one-process parallel state. Spawned expert-parallel workers import it too.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional

import pytest
import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import build_module

from megatron_elastic import parallel
from megatron_elastic.config import Config
from megatron_elastic.device import policy
from megatron_elastic.models.gpt import build_model, init_weights, layer_spec, transformer_config
from megatron_elastic.moe.layer import attach_elastic
from megatron_elastic.moe.router import ElasticRouter, elastic_routers
from megatron_elastic.moe.routing_math import top_p_k

# These run wherever the device policy puts the model: on CPU through the compat layer, on a GPU
# as they are (tools/gpu_check.sh runs them there). Inputs are made on the CPU generator and moved
# to the device so both draw the same numbers.
DEVICE = policy().device

# ---------------------------------------------------------------------- shared builders
# (also imported by tests/moe/test_moe_dist.py, whose spawned workers need them importable)

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
        attach_elastic(layers, cfg.elastic)
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
    return torch.randn(seq, batch, hidden, generator=g).to(DEVICE)


def loss_weights(seed: int, seq: int = SEQ, batch: int = BATCH, hidden: int = HIDDEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(seq, batch, hidden, generator=g).to(DEVICE)


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


# ---------------------------------------------------------------------- a small model
VOCAB = 64


def build_small_model(over: dict):
    cfg = make_cfg({"model.num_layers": 2, **over})
    model = build_model(cfg, VOCAB)
    return cfg, model


def model_forward(model, it: int, mb: int = 0, offset: int = 0, tokens: Optional[torch.Tensor] = None):
    if tokens is None:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + it))
    tokens = tokens.to(DEVICE)
    pos = torch.arange(tokens.shape[1], device=DEVICE).unsqueeze(0).expand(tokens.shape[0], -1)
    model.elastic_context.set(it, mb, offset)
    with torch.no_grad() if not model.training else torch.enable_grad():
        return model(tokens, pos, None)


def recording_routers(model) -> List[ElasticRouter]:
    routers = elastic_routers(model)
    for r in routers:
        r.record_routing = True
    return routers


def check_top_p(routers, inputs, p, k_min, k_max):
    for li, r in enumerate(routers):
        probs = torch.softmax(router_logits(r, inputs[li][-1]), dim=-1)
        k_tok = top_p_k(probs, p, k_min, k_max)
        rmap = r.last_routing_map
        assert torch.equal(rmap.sum(-1), k_tok)
        # the k_t selected experts are each token's k_t most probable ones
        order = probs.argsort(dim=-1, descending=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(8, device=order.device).expand_as(order))
        assert torch.equal(rmap, ranks < k_tok.unsqueeze(1))
        assert r.last_k is None
        assert r.last_mean_k == pytest.approx(float(k_tok.float().mean()))
    return k_tok


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

