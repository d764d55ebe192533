"""Hand-checkable tests for megatron_elastic.moe.schedules."""

import math
import random

import pytest
import torch

from megatron_elastic.moe.routing_math import derive_seed, splitmix64, top_p_k
from megatron_elastic.moe.schedules import (
    DISTRIBUTIONS,
    SCHEDULES,
    KSampler,
    k_distribution,
)

from reference_routing import ks_for_layers, make_generator

N_DRAWS = 10_000

# P(k) ∝ sqrt(k) for k = 1..6 (tau = 2); sum_k sqrt(k) = 10.831822...
SQRT_K_PROBS_1_TO_6 = [
    0.0923205710,  # 1      / 10.8318
    0.1305610035,  # 1.4142 / 10.8318
    0.1599039195,  # 1.7321 / 10.8318
    0.1846411419,  # 2      / 10.8318
    0.2064350724,  # 2.2361 / 10.8318
    0.2261382916,  # 2.4495 / 10.8318
]


def _assert_within_5_sigma(draws, ks, probs):
    """Per-bin binomial bound |count - n p| <= 5 sqrt(n p (1-p)) plus a chi-square check."""
    n = len(draws)
    counts = {k: 0 for k in ks}
    for d in draws:
        assert d in counts, f"draw {d} outside support {ks}"
        counts[d] += 1
    chi2 = 0.0
    for k, p in zip(ks, probs):
        expected = n * p
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[k] - expected) <= 5 * sigma, (k, counts[k], expected, sigma)
        chi2 += (counts[k] - expected) ** 2 / expected
    # dof = len(ks) - 1 <= 7; chi2 > 40 would be a p-value ~1e-6.
    assert chi2 < 40.0, chi2


# ----------------------------------------------------------------- hashing


def test_splitmix64_reference_vector():
    # Reference outputs of Vigna's splitmix64.c with state initialised to 1234567.
    expected = [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    state, out = 1234567, []
    for _ in range(5):
        out.append(splitmix64(state))
        state = (state + 0x9E3779B97F4A7C15) % 2**64
    assert out == expected


def test_derive_seed_pinned_and_order_sensitive():
    # Pinned: changing the hash silently would break resumed runs' k sequence.
    assert derive_seed(0) == 8147104208329303767
    assert derive_seed(1, 2, 3) == 7510213797696614745
    assert derive_seed(1, 2, 3) != derive_seed(3, 2, 1)
    assert derive_seed(1, 2) != derive_seed(1, 2, 0)
    assert 0 <= derive_seed(-1, 2**70) < 2**63
    with pytest.raises(TypeError):
        derive_seed(1.0)


def test_make_generator_is_deterministic():
    a = torch.rand(4, generator=make_generator(7, 1))
    b = torch.rand(4, generator=make_generator(7, 1))
    c = torch.rand(4, generator=make_generator(7, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------- k_distribution


def test_k_distribution_uniform():
    p = k_distribution(2, 5, "uniform")
    assert p.dtype == torch.float64
    assert torch.allclose(p, torch.full((4,), 0.25, dtype=torch.float64))


def test_k_distribution_weighted_tau2_is_sqrt_k():
    p = k_distribution(1, 6, "weighted", tau=2.0)
    assert torch.allclose(p, torch.tensor(SQRT_K_PROBS_1_TO_6, dtype=torch.float64), atol=1e-9)
    # Ratios are exactly sqrt ratios, e.g. P(4)/P(1) = 2.
    assert p[3] / p[0] == pytest.approx(2.0)


def test_k_distribution_weighted_tau1_is_linear_and_large_tau_is_uniform():
    p = k_distribution(1, 4, "weighted", tau=1.0)
    assert torch.allclose(p, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    p = k_distribution(1, 4, "weighted", tau=1e9)
    assert torch.allclose(p, torch.full((4,), 0.25, dtype=torch.float64))
    # Tiny tau must not overflow: all mass on k_max.
    p = k_distribution(1, 4, "weighted", tau=1e-4)
    assert torch.isfinite(p).all() and p[-1] == pytest.approx(1.0)


def test_k_distribution_single_point():
    assert k_distribution(3, 3, "weighted", 2.0).tolist() == [1.0]


@pytest.mark.parametrize(
    "args, msg",
    [
        ((0, 4, "uniform", 1.0), "k_min"),
        ((3, 2, "uniform", 1.0), "k_max"),
        ((1, 4, "gaussian", 1.0), "unknown k distribution"),
        ((1, 4, "weighted", 0.0), "tau"),
        ((1, 4, "weighted", -1.0), "tau"),
        ((1, 4, "weighted", float("nan")), "tau"),
        ((1.0, 4, "uniform", 1.0), "k_min"),
    ],
)
def test_k_distribution_validation(args, msg):
    with pytest.raises(ValueError, match=msg):
        k_distribution(*args)


# ----------------------------------------------------------------- empirical distributions


def _draws(sampler, schedule):
    """10^4 draws over the coordinate that changes the k for this schedule."""
    if schedule == "batch":
        return [sampler.k_for(i, 0, 0) for i in range(N_DRAWS)]
    if schedule == "microbatch":
        return [sampler.k_for(i // 8, i % 8, 0) for i in range(N_DRAWS)]
    return [sampler.k_for(i // 100, 0, i % 100) for i in range(N_DRAWS)]


@pytest.mark.parametrize("schedule", ["batch", "microbatch", "layerwise"])
def test_empirical_uniform(schedule):
    s = KSampler(schedule, 1, 6, "uniform", seed=123)
    _assert_within_5_sigma(_draws(s, schedule), list(range(1, 7)), [1 / 6] * 6)


@pytest.mark.parametrize("schedule", ["batch", "microbatch", "layerwise"])
def test_empirical_weighted_sqrt(schedule):
    s = KSampler(schedule, 1, 6, "weighted", tau=2.0, seed=321)
    _assert_within_5_sigma(_draws(s, schedule), list(range(1, 7)), SQRT_K_PROBS_1_TO_6)


def test_empirical_offset_range():
    s = KSampler("layerwise", 2, 8, "weighted", tau=1.0, seed=5)
    ks = list(range(2, 9))
    probs = [k / sum(ks) for k in ks]
    _assert_within_5_sigma(_draws(s, "layerwise"), ks, probs)
    assert s.expected_k == pytest.approx(sum(k * p for k, p in zip(ks, probs)))


# ----------------------------------------------------------------- granularity semantics


def test_fixed_schedule():
    s = KSampler("fixed", 1, 8)
    assert {s.k_for(i, m, l) for i in range(5) for m in range(3) for l in range(4)} == {8}
    s = KSampler("fixed", 1, 8, fixed_k=3)
    assert {s.k_for(i, m, l) for i in range(5) for m in range(3) for l in range(4)} == {3}
    assert not s.is_random and not s.per_token and s.expected_k == 3.0


def test_batch_identical_across_layers_and_microbatches():
    s = KSampler("batch", 1, 8, seed=1)
    per_iter = []
    for it in range(50):
        ks = {s.k_for(it, m, l) for m in range(4) for l in range(12)}
        assert len(ks) == 1
        per_iter.append(ks.pop())
    assert len(set(per_iter)) > 1  # but it does vary across iterations


def test_microbatch_identical_across_layers_varies_across_microbatches():
    s = KSampler("microbatch", 1, 8, seed=2)
    differs = 0
    for it in range(50):
        per_mb = []
        for m in range(4):
            ks = {s.k_for(it, m, l) for l in range(12)}
            assert len(ks) == 1
            per_mb.append(ks.pop())
        differs += len(set(per_mb)) > 1
    # P(4 draws from 8 values all equal) = 1/8^3; essentially every iteration differs.
    assert differs >= 45


def test_layerwise_differs_across_layers():
    s = KSampler("layerwise", 1, 8, seed=3)
    seq_l0 = [s.k_for(it, 0, 0) for it in range(500)]
    seq_l1 = [s.k_for(it, 0, 1) for it in range(500)]
    assert seq_l0 != seq_l1
    # Independent layers agree with probability sum_k P(k)^2 = 1/8, not 1.
    agree = sum(a == b for a, b in zip(seq_l0, seq_l1)) / 500
    assert abs(agree - 1 / 8) < 5 * math.sqrt((1 / 8) * (7 / 8) / 500)
    # And within one (iteration, micro-batch) the layers are not all equal.
    assert len(set(ks_for_layers(s, 0, 0, range(24)))) > 1
    # Micro-batch also matters for layerwise.
    assert [s.k_for(it, 0, 5) for it in range(100)] != [s.k_for(it, 1, 5) for it in range(100)]


@pytest.mark.parametrize("schedule", ["batch", "microbatch", "layerwise"])
def test_determinism_across_fresh_instances(schedule):
    coords = [(it, m, l) for it in (0, 1, 17, 10**6) for m in (0, 3) for l in (0, 1, 31)]
    a = [KSampler(schedule, 1, 8, "weighted", 2.0, seed=42).k_for(*c) for c in coords]
    b = [KSampler(schedule, 1, 8, "weighted", 2.0, seed=42).k_for(*c) for c in coords]
    s = KSampler(schedule, 1, 8, "weighted", 2.0, seed=42)
    c_rev = [s.k_for(*c) for c in reversed(coords)][::-1]  # call order is irrelevant
    assert a == b == c_rev
    d = [KSampler(schedule, 1, 8, "weighted", 2.0, seed=43).k_for(*c) for c in coords]
    assert a != d


def test_resume_matches_uninterrupted_run():
    full = KSampler("layerwise", 1, 8, seed=9)
    seq = [full.k_for(it, 0, l) for it in range(20) for l in range(4)]
    resumed = KSampler("layerwise", 1, 8, seed=9)
    tail = [resumed.k_for(it, 0, l) for it in range(10, 20) for l in range(4)]
    assert tail == seq[40:]


def test_global_rng_untouched():
    torch.manual_seed(0)
    random.seed(0)
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    for schedule in ("batch", "microbatch", "layerwise"):
        s = KSampler(schedule, 1, 8, "weighted", 2.0, seed=1)
        for it in range(20):
            s.k_for(it, it % 3, it % 5)
    torch.rand(1, generator=make_generator(1, 2))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_top_p_schedule_returns_upper_bound():
    s = KSampler("top_p", 1, 6, top_p=0.9)
    assert s.per_token and not s.is_random
    assert {s.k_for(it, 0, l) for it in range(10) for l in range(4)} == {6}
    assert s.top_p == 0.9


def test_properties_and_repr():
    s = KSampler("layerwise", 2, 4, "weighted", tau=1.0, seed=7)
    assert s.ks == [2, 3, 4]
    assert torch.allclose(s.probs, torch.tensor([2 / 9, 3 / 9, 4 / 9], dtype=torch.float64))
    assert s.expected_k == pytest.approx((4 + 9 + 16) / 9)
    assert "layerwise" in repr(s)
    assert s.seed_for(1, 2, 3) is not None
    assert KSampler("fixed", 1, 2).seed_for(1, 2, 3) is None
    # batch / microbatch drop irrelevant coordinates before hashing
    b = KSampler("batch", 1, 4)
    assert b.seed_for(5, 0, 0) == b.seed_for(5, 3, 9)
    m = KSampler("microbatch", 1, 4)
    assert m.seed_for(5, 3, 0) == m.seed_for(5, 3, 9) != m.seed_for(5, 2, 9)


def test_single_value_range_always_returns_it():
    s = KSampler("layerwise", 4, 4)
    assert {s.k_for(it, 0, l) for it in range(20) for l in range(3)} == {4}


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(schedule="per_step", k_min=1, k_max=4), "unknown k schedule"),
        (dict(schedule="batch", k_min=0, k_max=4), "k_min"),
        (dict(schedule="batch", k_min=5, k_max=4), "k_max"),
        (dict(schedule="batch", k_min=1, k_max=4, distribution="zipf"), "unknown k distribution"),
        (dict(schedule="batch", k_min=1, k_max=4, distribution="weighted", tau=0), "tau"),
        (dict(schedule="top_p", k_min=1, k_max=4), "requires top_p"),
        (dict(schedule="top_p", k_min=1, k_max=4, top_p=0.0), r"\(0, 1\]"),
        (dict(schedule="top_p", k_min=1, k_max=4, top_p=1.5), r"\(0, 1\]"),
        (dict(schedule="batch", k_min=1, k_max=4, top_p=0.5), "only valid with schedule 'top_p'"),
        (dict(schedule="fixed", k_min=1, k_max=4, fixed_k=5), "fixed_k"),
        (dict(schedule="batch", k_min=1, k_max=4, fixed_k=2), "only valid with schedule 'fixed'"),
        (dict(schedule="batch", k_min=1, k_max=4, seed=1.5), "seed"),
    ],
)
def test_sampler_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        KSampler(**kwargs)


def test_k_for_validation():
    s = KSampler("layerwise", 1, 4)
    with pytest.raises(ValueError, match="iteration"):
        s.k_for(-1, 0, 0)
    with pytest.raises(ValueError, match="layer"):
        s.k_for(0, 0, 1.0)


def test_constants():
    assert set(SCHEDULES) == {"fixed", "batch", "microbatch", "layerwise", "top_p"}
    assert set(DISTRIBUTIONS) == {"uniform", "weighted"}


# ----------------------------------------------------------------- top-p k


def test_top_p_k_hand_values():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    expect = {0.3: 1, 0.5: 1, 0.51: 2, 0.7: 2, 0.8: 2, 0.85: 3, 0.9: 3, 0.95: 4, 1.0: 4}
    for p, k in expect.items():
        out = top_p_k(probs, p, 1, 4)
        assert out.dtype == torch.long and out.tolist() == [k], (p, out)


def test_top_p_k_unsorted_rows_and_batch():
    probs = torch.tensor(
        [
            [0.1, 0.3, 0.1, 0.5],  # same multiset as above, shuffled
            [0.25, 0.25, 0.25, 0.25],
            [0.0, 1.0, 0.0, 0.0],
            [0.4, 0.35, 0.2, 0.05],
        ]
    )
    assert top_p_k(probs, 0.7, 1, 4).tolist() == [2, 3, 1, 2]
    assert top_p_k(probs, 0.9, 1, 4).tolist() == [3, 4, 1, 3]


def test_top_p_k_presorted_flag():
    sorted_probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    assert top_p_k(sorted_probs, 0.85, 1, 4, is_sorted=True).tolist() == [3]


def test_top_p_k_clipping():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.97, 0.01, 0.01, 0.01]])
    assert top_p_k(probs, 0.95, 1, 3).tolist() == [3, 1]  # 4 clipped down to k_max
    assert top_p_k(probs, 0.5, 2, 4).tolist() == [2, 2]  # 1 clipped up to k_min
    assert top_p_k(probs, 1.0, 2, 2).tolist() == [2, 2]


def test_top_p_k_leading_dims_and_float_precision():
    # float32 0.5+0.3 is not exactly 0.8; the tolerance keeps the hand answer.
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float32).expand(2, 3, 4)
    out = top_p_k(probs, 0.8, 1, 4)
    assert out.shape == (2, 3) and (out == 2).all()
    assert top_p_k(probs.to(torch.bfloat16), 1.0, 1, 4).unique().tolist() == [4]


def test_top_p_k_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 8, generator=g, dtype=torch.float64) * 2, dim=-1)
    for p in (0.3, 0.6, 0.9):
        got = top_p_k(probs, p, 1, 8, atol=0.0)
        for row, k in zip(probs, got.tolist()):
            s = sorted(row.tolist(), reverse=True)
            expected = next(j + 1 for j in range(8) if sum(s[: j + 1]) >= p)
            assert k == expected


def test_top_p_k_no_grad_and_validation():
    probs = torch.tensor([[0.6, 0.4]], requires_grad=True)
    assert not top_p_k(probs, 0.5, 1, 2).requires_grad
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            top_p_k(probs, bad, 1, 2)
    with pytest.raises(ValueError, match="k_min"):
        top_p_k(probs, 0.5, 0, 2)
    with pytest.raises(ValueError, match="k_max"):
        top_p_k(probs, 0.5, 2, 1)
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        top_p_k(probs, 0.5, 1, 3)
