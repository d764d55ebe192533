"""Hand-checkable tests for megatron_elastic.moe.routing_math.

Where a function mirrors Megatron-core behaviour, the test calls Megatron-core
directly (``megatron.core.transformer.moe.moe_utils``) for comparison.
"""

import itertools
import math

import pytest
import torch

from megatron_elastic.moe.routing_math import (
    candidate_pool_size,
    expert_cooccurrence,
    hierarchical_router_loss,
    per_token_topk,
    sample_from_candidate_pool,
)

from reference_routing import switch_load_balancing_loss_variable_k, to_dense, topk_renormalized

moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

HAND = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])


def _random_probs(t, n, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n, generator=g, dtype=torch.float64) * scale
    return torch.softmax(logits, dim=-1).to(dtype), logits.to(dtype)


# ----------------------------------------------------------------- top-k


def test_topk_renormalized_hand_values():
    gates, idx = topk_renormalized(HAND, 2)
    assert idx.tolist() == [[0, 1], [3, 2]]
    assert torch.allclose(gates, torch.tensor([[0.625, 0.375], [4 / 7, 3 / 7]]))
    gates, idx = topk_renormalized(HAND, 1)
    assert gates.tolist() == [[1.0], [1.0]] and idx.tolist() == [[0], [3]]
    gates, _ = topk_renormalized(HAND, 4)
    assert torch.allclose(gates.sum(-1), torch.ones(2))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_topk_renormalized_matches_megatron_default_router(k):
    # Megatron's default (moe_router_pre_softmax=False): top-k of logits, softmax over them.
    probs, logits = _random_probs(64, 8, seed=k)
    routing_probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits, k, use_pre_softmax=False, score_function="softmax"
    )
    gates, idx = topk_renormalized(probs, k)
    rmap, dense = to_dense(gates, idx, 8)
    assert routing_map.dtype == torch.bool and rmap.dtype == torch.bool
    assert routing_probs.shape == dense.shape == (64, 8)
    assert torch.equal(rmap, routing_map)
    assert torch.allclose(dense, routing_probs, atol=1e-6)


def test_topk_renormalized_validation():
    with pytest.raises(ValueError, match="k=5"):
        topk_renormalized(HAND, 5)
    with pytest.raises(ValueError, match="k=0"):
        topk_renormalized(HAND, 0)
    with pytest.raises(ValueError, match="2-D"):
        topk_renormalized(HAND[0], 1)


def test_to_dense_hand_values_and_grad():
    gates = torch.tensor([[0.625, 0.375], [4 / 7, 3 / 7]], requires_grad=True)
    idx = torch.tensor([[0, 1], [3, 2]])
    rmap, dense = to_dense(gates, idx, 5)
    assert rmap.tolist() == [[True, True, False, False, False], [False, False, True, True, False]]
    assert torch.allclose(dense, torch.tensor([[0.625, 0.375, 0, 0, 0], [0, 0, 3 / 7, 4 / 7, 0]]))
    (dense * torch.arange(5.0)).sum().backward()
    assert gates.grad.tolist() == [[0.0, 1.0], [3.0, 2.0]]
    with pytest.raises(ValueError):
        to_dense(gates, idx[:, :1], 5)
    with pytest.raises(ValueError):
        to_dense(gates, idx, 1)


# ----------------------------------------------------------------- per-token top-k


def test_per_token_topk_hand_values():
    rmap, gates = per_token_topk(HAND, torch.tensor([1, 3]), k_max=3)
    assert rmap.tolist() == [[True, False, False, False], [False, True, True, True]]
    assert torch.allclose(gates, torch.tensor([[1.0, 0, 0, 0], [0, 2 / 9, 3 / 9, 4 / 9]]))


def test_per_token_topk_equals_fixed_topk_when_k_constant():
    probs, _ = _random_probs(50, 8, seed=3)
    for k in (1, 2, 5):
        rmap, gates = per_token_topk(probs, torch.full((50,), k), k_max=6)
        ref_map, ref_dense = to_dense(*topk_renormalized(probs, k), 8)
        assert torch.equal(rmap, ref_map)
        assert torch.allclose(gates, ref_dense, atol=1e-6)


def test_per_token_topk_with_top_p_and_grad():
    from megatron_elastic.moe.routing_math import top_p_k

    probs, logits = _random_probs(40, 8, seed=4, dtype=torch.float64)
    k = top_p_k(probs, 0.7, 1, 4)
    rmap, gates = per_token_topk(probs, k, k_max=4)
    assert torch.equal(rmap.sum(-1), k)
    assert torch.allclose(gates.sum(-1), torch.ones(40, dtype=torch.float64))
    assert ((gates > 0) == rmap).all()
    # Renormalised over the token's own selection: ratios equal the probs' ratios.
    assert torch.allclose(gates, probs * rmap / (probs * rmap).sum(-1, keepdim=True))
    logits = logits.clone().requires_grad_(True)
    _, g = per_token_topk(torch.softmax(logits, -1), k, k_max=4)
    g.pow(2).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_per_token_topk_validation():
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        per_token_topk(HAND, torch.tensor([1, 3]), k_max=2)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        per_token_topk(HAND, torch.tensor([0, 1]), k_max=2)
    with pytest.raises(ValueError, match="shape"):
        per_token_topk(HAND, torch.tensor([1]), k_max=2)
    with pytest.raises(ValueError, match="integer"):
        per_token_topk(HAND, torch.tensor([1.0, 2.0]), k_max=2)
    with pytest.raises(ValueError, match="k_max"):
        per_token_topk(HAND, torch.tensor([1, 1]), k_max=5)


# ----------------------------------------------------------------- candidate pool (EMoE)


def test_candidate_pool_size():
    assert candidate_pool_size(2, 2.0, 8) == 4
    assert candidate_pool_size(4, 1.5, 8) == 6
    assert candidate_pool_size(3, 1.0, 8) == 3
    assert candidate_pool_size(3, 1.5, 8) == 5  # ceil(4.5)
    assert candidate_pool_size(4, 3.0, 8) == 8  # clipped to N
    with pytest.raises(ValueError, match="pool_ratio"):
        candidate_pool_size(2, 0.5, 8)
    with pytest.raises(ValueError, match="k=9"):
        candidate_pool_size(9, 1.0, 8)


def test_candidate_pool_statistics():
    t, n, k, k_ideal = 20_000, 8, 2, 4
    probs, _ = _random_probs(t, n, seed=5)
    g = torch.Generator().manual_seed(123)
    gates, idx = sample_from_candidate_pool(probs, k, k_ideal, g)
    assert gates.shape == idx.shape == (t, k)
    pool = torch.topk(probs, k_ideal, dim=-1).indices
    # Only pool members are chosen, exactly k distinct experts per token.
    in_pool = (idx.unsqueeze(-1) == pool.unsqueeze(1)).any(-1)
    assert in_pool.all()
    assert (idx.sort(-1).values[:, 1:] != idx.sort(-1).values[:, :-1]).all()
    # Each pool rank (1st..4th most probable) is chosen with prob k/k_ideal = 1/2.
    chosen_rank = (idx.unsqueeze(-1) == pool.unsqueeze(1)).any(1)  # [T, k_ideal]
    p = k / k_ideal
    sigma = math.sqrt(t * p * (1 - p))
    for r in range(k_ideal):
        assert abs(chosen_rank[:, r].sum().item() - t * p) <= 5 * sigma
    # Stronger: all C(4, 2) = 6 subsets equally likely (uniform without replacement).
    codes = (chosen_rank.long() * (2 ** torch.arange(k_ideal))).sum(-1)
    q = 1 / math.comb(k_ideal, k)
    sigma = math.sqrt(t * q * (1 - q))
    for subset in itertools.combinations(range(k_ideal), k):
        c = (codes == sum(2**r for r in subset)).sum().item()
        assert abs(c - t * q) <= 5 * sigma, (subset, c)
    # Gates: renormalised over the sampled set, proportional to the probs.
    sel = torch.gather(probs, 1, idx)
    assert torch.allclose(gates.sum(-1), torch.ones(t), atol=1e-6)
    assert torch.allclose(gates, sel / sel.sum(-1, keepdim=True), atol=1e-6)


def test_candidate_pool_hand_example_and_full_pool():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # k == k_ideal: the sample is the whole pool = ordinary top-k.
    gates, idx = sample_from_candidate_pool(probs, 2, 2, torch.Generator().manual_seed(0))
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [0, 1]
    assert torch.allclose(gates[0][order], torch.tensor([4 / 7, 3 / 7]))
    # k=2 of pool {0,1,2}: every draw's gates are the pair's probs renormalised.
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(60):
        gates, idx = sample_from_candidate_pool(probs, 2, 3, g)
        pair = tuple(sorted(idx[0].tolist()))
        seen.add(pair)
        assert 3 not in pair
        expected = probs[0, idx[0]] / probs[0, idx[0]].sum()
        assert torch.allclose(gates[0], expected)
    assert seen == {(0, 1), (0, 2), (1, 2)}


def test_candidate_pool_determinism_grad_and_global_rng():
    probs, logits = _random_probs(32, 8, seed=6)
    state = torch.get_rng_state()
    a = sample_from_candidate_pool(probs, 2, 4, torch.Generator().manual_seed(9))
    b = sample_from_candidate_pool(probs, 2, 4, torch.Generator().manual_seed(9))
    c = sample_from_candidate_pool(probs, 2, 4, torch.Generator().manual_seed(10))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])
    logits = logits.clone().requires_grad_(True)
    gates, _ = sample_from_candidate_pool(torch.softmax(logits, -1), 2, 4, torch.Generator())
    (gates * torch.arange(2.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_candidate_pool_validation():
    g = torch.Generator()
    with pytest.raises(ValueError, match="k_ideal=5 exceeds"):
        sample_from_candidate_pool(HAND, 2, 5, g)
    with pytest.raises(ValueError, match="k=3 must not exceed k_ideal=2"):
        sample_from_candidate_pool(HAND, 3, 2, g)
    with pytest.raises(ValueError, match="k=0"):
        sample_from_candidate_pool(HAND, 0, 2, g)


# ----------------------------------------------------------------- hierarchical router loss


def test_router_loss_hand_values():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    # row 0: uniform -> 0; row 1: one-hot -> -log 4; mean = -log(4)/2.
    assert hierarchical_router_loss(probs[:1]).item() == pytest.approx(0.0, abs=1e-7)
    assert hierarchical_router_loss(probs[1:]).item() == pytest.approx(-math.log(4))
    assert hierarchical_router_loss(probs).item() == pytest.approx(-math.log(4) / 2)
    assert hierarchical_router_loss(probs, coeff=0.1).item() == pytest.approx(-0.1 * math.log(4) / 2)
    # [0.5, 0.5, 0, 0]: H = log 2 -> log 2 - log 4 = -log 2.
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert hierarchical_router_loss(half).item() == pytest.approx(-math.log(2))


def test_router_loss_leaves_padding_out_of_the_mean():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # Rows 0 and 2 are data: mean of 0 and -log 2; row 1 (one-hot, -log 4) is padding.
    pad = torch.tensor([False, True, False])
    assert hierarchical_router_loss(probs, padding=pad).item() == pytest.approx(-math.log(2) / 2)
    assert hierarchical_router_loss(probs, padding=torch.zeros(3, dtype=torch.bool)).item() == pytest.approx(
        hierarchical_router_loss(probs).item())
    assert hierarchical_router_loss(probs, padding=torch.ones(3, dtype=torch.bool)).item() == 0.0  # all padding


def test_router_loss_equals_negative_kl_to_uniform():
    probs, _ = _random_probs(16, 8, seed=7, dtype=torch.float64)
    u = torch.full_like(probs, 1 / 8)
    neg_kl = -(probs * (probs / u).log()).sum(-1).mean()
    # torch's kl_div(input=log q, target=p) = sum p (log p - log q) = KL(p || q)
    kl_torch = torch.nn.functional.kl_div(u.log(), probs, reduction="batchmean")
    assert hierarchical_router_loss(probs).item() == pytest.approx(neg_kl.item(), abs=1e-12)
    assert hierarchical_router_loss(probs).item() == pytest.approx(-kl_torch.item(), abs=1e-12)
    assert -math.log(8) <= hierarchical_router_loss(probs).item() <= 0


def test_router_loss_gradient_through_softmax():
    _, logits = _random_probs(2, 4, seed=8, dtype=torch.float64)
    logits = logits.clone().requires_grad_(True)

    def f(z):
        return hierarchical_router_loss(torch.softmax(z, dim=-1))

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8)
    # Analytic: dL/dz_tj = -p_tj (log p_tj + H_t) / T.
    (grad,) = torch.autograd.grad(f(logits), logits)
    p = torch.softmax(logits.detach(), -1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    assert torch.allclose(grad, -p * (p.log() + h) / 2, atol=1e-12)
    # Central finite differences, element by element.
    eps = 1e-6
    for i, j in itertools.product(range(2), range(4)):
        zp, zm = logits.detach().clone(), logits.detach().clone()
        zp[i, j] += eps
        zm[i, j] -= eps
        fd = (f(zp) - f(zm)).item() / (2 * eps)
        assert fd == pytest.approx(grad[i, j].item(), abs=1e-8)
    # Gradient points away from uniform: a descent step sharpens the router.
    with torch.no_grad():
        sharper = logits - 0.1 * grad
    assert f(sharper) < f(logits)


def test_router_loss_safe_with_exact_zeros_and_low_precision():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    loss = hierarchical_router_loss(probs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(probs.grad).all()
    # Saturated logits (softmax underflows to exact 0) still give finite gradients.
    z = torch.tensor([[200.0, -200.0, 0.0, -50.0]], requires_grad=True)
    hierarchical_router_loss(torch.softmax(z, -1)).backward()
    assert torch.isfinite(z.grad).all()
    bf = hierarchical_router_loss(torch.full((3, 4), 0.25, dtype=torch.bfloat16))
    assert bf.dtype == torch.float32 and bf.item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------- load-balancing loss


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_lb_loss_matches_megatron_at_fixed_k(k):
    t, n, coeff = 96, 8, 0.01
    _, logits = _random_probs(t, n, seed=10 + k)
    # Exactly what TopKRouter._apply_aux_loss feeds Megatron's loss (TP/CP size 1).
    routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, k, "softmax")
    scores_a = scores.clone().requires_grad_(True)
    scores_b = scores.clone().requires_grad_(True)
    ref = moe_utils.switch_load_balancing_loss_func(
        probs=scores_a,
        tokens_per_expert=routing_map.sum(dim=0),
        total_num_tokens=t,
        topk=k,
        num_experts=n,
        moe_aux_loss_coeff=coeff,
        fused=False,
    )
    ours = switch_load_balancing_loss_variable_k(scores_b, routing_map, k_used=k, coeff=coeff)
    inferred = switch_load_balancing_loss_variable_k(scores, routing_map, coeff=coeff)
    per_token = switch_load_balancing_loss_variable_k(
        scores, routing_map, k_used=torch.full((t,), k), coeff=coeff
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert inferred.item() == pytest.approx(ref.item(), rel=1e-6)
    assert per_token.item() == pytest.approx(ref.item(), rel=1e-6)
    ref.backward()
    ours.backward()
    assert torch.allclose(scores_a.grad, scores_b.grad)


def test_lb_loss_matches_megatron_with_explicit_counts():
    # Global-level counts (as after the TP/CP all-reduce) passed through unchanged.
    probs, _ = _random_probs(10, 4, seed=11)
    # 20 global tokens at k=2 -> the counts sum to 40.
    tpe = torch.tensor([12.0, 10.0, 9.0, 9.0])
    ref = moe_utils.switch_load_balancing_loss_func(probs, tpe, 20, 2, 4, 1.0)
    ours = switch_load_balancing_loss_variable_k(
        probs, probs > 0, k_used=2, tokens_per_expert=tpe, total_num_tokens=20
    )
    inferred = switch_load_balancing_loss_variable_k(
        probs, probs > 0, tokens_per_expert=tpe, total_num_tokens=20
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    # k inferred as sum(tpe) / total_num_tokens = 40 / 20 = 2.
    assert inferred.item() == pytest.approx(ref.item(), rel=1e-6)


def test_lb_loss_hand_values():
    n = 4
    eye = torch.eye(n)
    # Perfect balance (token t -> expert t with prob 1): f_i = P_i = 1/4 -> 4 * 4/16 = 1.
    assert switch_load_balancing_loss_variable_k(eye, eye.bool(), 1).item() == pytest.approx(1.0)
    # Collapse onto expert 0: f_0 = P_0 = 1 -> N = 4.
    collapse = torch.zeros(n, n)
    collapse[:, 0] = 1.0
    assert switch_load_balancing_loss_variable_k(collapse, collapse.bool(), 1).item() == 4.0
    # coeff scales linearly.
    assert switch_load_balancing_loss_variable_k(eye, eye.bool(), 1, 0.5).item() == 0.5


def test_lb_loss_scale_invariant_in_k():
    """Uniform router probs: the normalised loss is 1 for every k; Megatron's
    fixed-topk normalisation would report k / topk instead."""
    t, n = 12, 6
    probs = torch.full((t, n), 1 / n)
    for k in range(1, n + 1):
        routing_map = torch.zeros(t, n, dtype=torch.bool)
        for i in range(t):
            routing_map[i, [(i + j) % n for j in range(k)]] = True
        ours = switch_load_balancing_loss_variable_k(probs, routing_map, k)
        assert ours.item() == pytest.approx(1.0)
        mcore_fixed = moe_utils.switch_load_balancing_loss_func(
            probs, routing_map.sum(0), t, n, n, 1.0
        )
        assert mcore_fixed.item() == pytest.approx(k / n)


def test_lb_loss_variable_per_token_k_uses_mean():
    probs = HAND
    k_tok = torch.tensor([1, 3])
    routing_map, _ = per_token_topk(probs, k_tok, 3)
    # tokens_per_expert = [1, 1, 1, 1]; sum_t probs = [0.6, 0.5, 0.4, 0.5]
    # loss = 4 / (mean_k=2 * 2 * 2) * (0.6 + 0.5 + 0.4 + 0.5) = 0.5 * 2.0 = 1.0
    assert switch_load_balancing_loss_variable_k(probs, routing_map, k_tok).item() == (
        pytest.approx(1.0)
    )
    assert switch_load_balancing_loss_variable_k(probs, routing_map).item() == pytest.approx(1.0)
    assert switch_load_balancing_loss_variable_k(probs, routing_map, 2).item() == pytest.approx(1.0)


def test_lb_loss_validation():
    with pytest.raises(ValueError, match="routing_map shape"):
        switch_load_balancing_loss_variable_k(HAND, torch.ones(2, 3, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="k_used"):
        switch_load_balancing_loss_variable_k(HAND, HAND > 0, 0)
    with pytest.raises(ValueError, match="k_used"):
        switch_load_balancing_loss_variable_k(HAND, HAND > 0, "2")
    with pytest.raises(ValueError, match="tokens_per_expert"):
        switch_load_balancing_loss_variable_k(
            HAND, HAND > 0, 1, tokens_per_expert=torch.ones(3)
        )


# ----------------------------------------------------------------- co-occurrence


def test_expert_cooccurrence_hand_values():
    routing_map = torch.tensor(
        [[1, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool
    )
    c = expert_cooccurrence(routing_map)
    expected = torch.tensor(
        [[3 / 4, 2 / 4, 1 / 4], [2 / 4, 2 / 4, 0.0], [1 / 4, 0.0, 2 / 4]]
    )
    assert c.dtype == torch.float32
    assert torch.allclose(c, expected)
    assert torch.equal(c, c.T)


def test_expert_cooccurrence_row_sums_and_validation():
    probs, _ = _random_probs(100, 8, seed=12)
    routing_map, _ = to_dense(*topk_renormalized(probs, 3), 8)
    c = expert_cooccurrence(routing_map)
    assert c.diagonal().sum().item() == pytest.approx(3.0)  # mean k
    assert c.sum().item() == pytest.approx(9.0)  # E[k^2] = 9 for constant k=3
    with pytest.raises(ValueError):
        expert_cooccurrence(routing_map[0])
    with pytest.raises(ValueError):
        expert_cooccurrence(routing_map[:0])
