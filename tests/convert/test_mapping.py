"""Tensor mapping details (convert/mapping.py): QKV split by query groups, every expert layout
(sequential, grouped, stacked, singleton shards) exporting the same tensors, and a stored expert
axis shorter than the config's expert count rejected rather than truncated.
"""

from __future__ import annotations

import re

import pytest
import torch


# ------------------------------------------------------------------------------ mapping details
def _shape(**kw):
    from megatron_elastic.convert.mapping import ModelShape

    base = dict(architecture="mixtral", num_layers=2, hidden_size=16, num_heads=4, num_query_groups=2,
                head_dim=4, num_experts=3, ffn_hidden_size=8, vocab_size=64, qk_layernorm=False,
                tied_embeddings=False)
    base.update(kw)
    return ModelShape(**base)


def test_qkv_split_follows_query_groups():
    from megatron_elastic.convert.mapping import merge_qkv, split_qkv

    shape = _shape()
    # Row r of Megatron's QKV is tagged with its (group, slot, row-in-head): slots 0..1 are the
    # group's query heads, 2 its key head, 3 its value head.
    tags = torch.tensor([[g * 100 + s * 10 + d] * 16 for g in range(2) for s in range(4) for d in range(4)],
                        dtype=torch.float32)
    q, k, v = split_qkv(tags, shape)
    assert q[:, 0].tolist() == [g * 100 + s * 10 + d for g in range(2) for s in range(2) for d in range(4)]
    assert k[:, 0].tolist() == [g * 100 + 20 + d for g in range(2) for d in range(4)]
    assert v[:, 0].tolist() == [g * 100 + 30 + d for g in range(2) for d in range(4)]
    assert torch.equal(merge_qkv(q, k, v, shape), tags)


def _sequential_state_dict(shape, seed=0):
    from megatron_elastic.convert.mapping import megatron_param_shapes

    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(s, generator=g) for name, s in megatron_param_shapes(shape).items()}


def test_grouped_sequential_and_checkpoint_expert_layouts_agree():
    """Expert weights stored sequentially, grouped, stacked (dist checkpoint) or as singleton
    shards with separate gate/up keys all export to the same tensors."""
    from megatron_elastic.config import Config
    from megatron_elastic.convert.to_hf import megatron_state_dict_to_hf

    shape = _shape()
    cfg = Config.from_dict({"model": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
                                      "num_query_groups": 2, "num_moe_experts": 3, "moe_ffn_hidden_size": 8,
                                      "moe_router_topk": 2}}).validate()
    seq = _sequential_state_dict(shape)
    expected = megatron_state_dict_to_hf(seq, cfg)
    assert len([n for n in expected if n.endswith(".w1.weight")]) == 2 * 3

    grouped = {re.sub(r"local_experts\.(\d+)\.(linear_fc\d\.weight)", r"\2\1", k): v for k, v in seq.items()}
    assert any(re.search(r"linear_fc1\.weight2$", k) for k in grouped)

    stacked = {k: v for k, v in seq.items() if not k.startswith("decoder.layers.")}
    per_layer = [{k.split(f"decoder.layers.{i}.", 1)[1]: v for k, v in seq.items()
                  if k.startswith(f"decoder.layers.{i}.")} for i in range(2)]
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    for suffix in per_layer[0]:
        if ".local_experts." in suffix:
            continue
        stacked[f"decoder.layers.{te_names.get(suffix, suffix)}"] = torch.stack([p[suffix] for p in per_layer])
    for fc in (1, 2):
        stacked[f"decoder.layers.mlp.experts.experts.linear_fc{fc}.weight"] = torch.stack([
            torch.stack([p[f"mlp.experts.local_experts.{j}.linear_fc{fc}.weight"] for j in range(3)])
            for p in per_layer])

    singleton = {}
    for k, v in seq.items():
        m = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc(\d)\.weight", k)
        if m and m[3] == "1":
            prefix = f"decoder.layers.{m[1]}.mlp.experts.experts.{m[2]}.linear_fc1.weight"
            singleton[prefix + "_w"], singleton[prefix + "_v"] = v.chunk(2)
        elif m:
            singleton[f"decoder.layers.{m[1]}.mlp.experts.experts.{m[2]}.linear_fc2.weight"] = v
        else:
            singleton[k] = v
    for layout in (grouped, stacked, singleton):
        got = megatron_state_dict_to_hf(layout, cfg)
        assert set(got) == set(expected)
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_checkpoint_with_fewer_experts_is_rejected_not_truncated():
    """A stored expert axis shorter than the config's expert count (experts of other EP ranks
    missing) is an error naming the key, never a silently smaller model."""
    from megatron_elastic.convert import ShapeMismatchError
    from megatron_elastic.convert.mapping import megatron_layer_tensors, resolve

    shape = _shape()
    down = next(t for t in megatron_layer_tensors(shape, 1) if t.expert == 2 and t.fc == 2)
    stored = {"decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 2, 16, 8)}
    with pytest.raises(ShapeMismatchError, match=r"linear_fc2\.weight.*holds 2 experts.*num_moe_experts=3"):
        resolve(down, shape, stored, "checkpoint")
    stored = {"decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 3, 16, 8)}
    ref = resolve(down, shape, stored, "checkpoint")
    assert (ref.key, ref.index) == ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 2))


def test_shared_expert_dense_layer_and_bias_export_from_every_expert_layout():
    """Qwen2-MoE shape (gated shared expert, q/k/v bias, layer 1 dense): sequential, grouped
    (moe_grouped_gemm) and singleton-shard expert names, and Transformer Engine's fused norm names,
    all export the same hub tensors; the shared expert's and dense MLP's [gate; up] fc1 split into
    gate_proj / up_proj rows."""
    from megatron_elastic.config import Config
    from megatron_elastic.convert.mapping import hf_expected_shapes
    from megatron_elastic.convert.to_hf import megatron_state_dict_to_hf

    cfg = Config.from_dict({"model": {
        "num_layers": 3, "hidden_size": 16, "num_attention_heads": 4, "num_query_groups": 2, "num_moe_experts": 3,
        "moe_ffn_hidden_size": 8, "ffn_hidden_size": 12, "moe_layer_freq": [1, 0, 1], "add_qkv_bias": True,
        "moe_shared_expert_intermediate_size": 6, "moe_shared_expert_gate": True}}).validate()
    shape = _shape(architecture="qwen2_moe", num_layers=3, dense_layers=(1,), dense_ffn_hidden_size=12,
                   shared_expert_size=6, shared_expert_gate=True, qkv_bias=True)
    seq = _sequential_state_dict(shape)
    expected = megatron_state_dict_to_hf(seq, cfg)
    assert dict((n, tuple(t.shape)) for n, t in expected.items()) == hf_expected_shapes(shape)
    fc1 = seq["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(expected["model.layers.1.mlp.gate_proj.weight"], fc1[:12])
    assert torch.equal(expected["model.layers.1.mlp.up_proj.weight"], fc1[12:])
    shared = seq["decoder.layers.2.mlp.shared_experts.linear_fc1.weight"]
    assert torch.equal(expected["model.layers.2.mlp.shared_expert.up_proj.weight"], shared[6:])
    assert "model.layers.1.mlp.gate.weight" not in expected and "model.layers.0.mlp.gate.weight" in expected

    te_names = {r"input_layernorm\.weight$": "self_attention.linear_qkv.layer_norm_weight",
                r"pre_mlp_layernorm\.weight$": "mlp.linear_fc1.layer_norm_weight"}
    grouped = {}
    for k, v in seq.items():
        k = re.sub(r"local_experts\.(\d+)\.(linear_fc\d\.weight)", r"\2\1", k)
        for pattern, te in te_names.items():
            k = re.sub(pattern, te, k)
        grouped[k] = v
    singleton = {}
    for k, v in seq.items():
        m = re.match(r"(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.linear_fc(\d)\.weight", k)
        if m and m[3] == "1":
            key = f"{m[1]}experts.{m[2]}.linear_fc1.weight"
            singleton[key + "_w"], singleton[key + "_v"] = v.chunk(2)
        elif m:
            singleton[f"{m[1]}experts.{m[2]}.linear_fc2.weight"] = v
        else:
            singleton[k] = v
    for layout in (grouped, singleton):
        got = megatron_state_dict_to_hf(layout, cfg)
        assert set(got) == set(expected)
        assert all(torch.equal(got[n], expected[n]) for n in expected)
