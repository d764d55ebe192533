"""SDPAttention (megatron_elastic.models.attention) against softmax(Q K^T / sqrt(d)) V written out
by hand, on tiny tensors in Megatron's [sequence, batch, heads, head_dim] layout: the causal mask,
grouped-query attention (each key/value head serves consecutive query heads), Megatron's padding
masks (True = excluded), a given softmax scale, the tensor-parallel head split, no dropout in
eval mode, and the refusals (context parallelism, packed sequences, bias)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_elastic.models.attention import SDPAttention


def tp_group(size: int):
    """What SDPAttention reads from its ProcessGroupCollection: ``pg_collection.tp.size()``."""
    return SimpleNamespace(tp=SimpleNamespace(size=lambda: size))


def make(heads=4, groups=2, head_dim=3, mask=AttnMaskType.causal, tp=1, dropout=0.0, **kwargs):
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, attention_dropout=dropout)
    return SDPAttention(config, layer_number=1, attn_mask_type=mask, attention_type="self",
                        pg_collection=tp_group(tp), **kwargs)


def reference(q, k, v, scale, exclude=None, causal=True):
    """Per batch element and head: softmax(q k^T * scale + mask) v, heads concatenated."""
    s, b, n, d = q.shape
    rep = n // k.shape[2]
    out = torch.empty(s, b, n * d, dtype=torch.float64)
    for bi in range(b):
        for h in range(n):
            g = h // rep  # query head h reads key/value head h // (heads per group)
            scores = q[:, bi, h].double() @ k[:, bi, g].double().T * scale
            if causal:
                scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), -math.inf)
            if exclude is not None:
                scores = scores.masked_fill(exclude[bi, 0], -math.inf)
            out[:, bi, h * d:(h + 1) * d] = torch.softmax(scores, dim=-1) @ v[:, bi, g].double()
    return out


def qkv(s=5, b=2, heads=4, groups=2, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, d, generator=gen), torch.randn(s, b, groups, d, generator=gen),
            torch.randn(s, b, groups, d, generator=gen))


def test_hand_computed_causal_values():
    """One head, d = 1 (scale 1), two positions. Position 0 sees only itself: out = v0 = 4.
    Position 1: scores (q1 k0, q1 k1) = (0, ln 3) -> weights (1/4, 3/4) -> 4/4 + 3*8/4 = 7."""
    attn = make(heads=1, groups=1, head_dim=1).eval()
    q = torch.tensor([5.0, 1.0]).view(2, 1, 1, 1)
    k = torch.tensor([0.0, math.log(3.0)]).view(2, 1, 1, 1)
    v = torch.tensor([4.0, 8.0]).view(2, 1, 1, 1)
    out = attn(q, k, v, attention_mask=None)
    assert out.shape == (2, 1, 1)
    torch.testing.assert_close(out.view(2), torch.tensor([4.0, 7.0]))


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1)])
def test_causal_gqa_matches_reference(heads, groups):
    attn = make(heads=heads, groups=groups).eval()
    q, k, v = qkv(heads=heads, groups=groups)
    out = attn(q, k, v, attention_mask=None)
    assert out.shape == (5, 2, heads * 3)
    torch.testing.assert_close(out.double(), reference(q, k, v, 1 / math.sqrt(3)), atol=1e-6, rtol=1e-5)
    # causality: changing the last position's key/value leaves every earlier output unchanged
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 1.0
    v2[-1] -= 1.0
    torch.testing.assert_close(attn(q, k2, v2, attention_mask=None)[:-1], out[:-1])


def test_padding_mask_excludes_true_positions_and_scale_is_used():
    attn = make(mask=AttnMaskType.padding, softmax_scale=0.5).eval()
    q, k, v = qkv()
    exclude = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    exclude[0, 0, :, 3:] = True  # batch 0: the last two keys are padding
    out = attn(q, k, v, attention_mask=exclude)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.5, exclude, causal=False), atol=1e-6, rtol=1e-5)
    # no mask at all: full (bidirectional) attention
    full = attn(q, k, v, attention_mask=None)
    torch.testing.assert_close(full.double(), reference(q, k, v, 0.5, causal=False), atol=1e-6, rtol=1e-5)


def test_tensor_parallel_rank_holds_its_share_of_heads():
    """TP = 2 of 4 heads / 2 groups: a rank gets 2 query heads and 1 key/value head."""
    attn = make(tp=2).eval()
    assert (attn.heads_per_partition, attn.groups_per_partition, attn.hidden_size_per_partition) == (2, 1, 6)
    q, k, v = qkv(heads=2, groups=1)
    out = attn(q, k, v, attention_mask=None)
    torch.testing.assert_close(out.double(), reference(q, k, v, 1 / math.sqrt(3)), atol=1e-6, rtol=1e-5)


def test_dropout_only_in_training_mode():
    attn = make(dropout=0.5)
    q, k, v = qkv()
    expected = reference(q, k, v, 1 / math.sqrt(3))
    torch.testing.assert_close(attn.eval()(q, k, v, attention_mask=None).double(), expected, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(attn.train()(q, k, v, attention_mask=None).double(), expected, atol=1e-3)


def test_refusals():
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, kv_channels=4,
                               context_parallel_size=2)
    with pytest.raises(ValueError, match="context parallelism"):
        SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp_group(1))
    attn = make().eval()
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="packed sequences"):
        attn(q, k, v, attention_mask=None, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="bias"):
        attn(q, k, v, attention_mask=None, attention_bias=torch.zeros(1))
