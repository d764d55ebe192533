"""Router diagnostics of the study (megatron_elastic/study/diagnostics.py) on hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_elastic.study import diagnostics as diag


def test_expert_load_of_balanced_and_skewed_maps():
    balanced = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    assert diag.expert_load(balanced) == {"load_cv": 0.0, "load_max_over_mean": 1.0}
    # Slots: expert 0 gets 3 of 4, expert 1 gets 1 of 4: shares (0.75, 0.25), mean 0.5,
    # population std 0.25 -> CV 0.5; max/mean 1.5.
    skewed = torch.tensor([[1, 0], [1, 0], [1, 1]], dtype=torch.bool)
    out = diag.expert_load(skewed)
    assert out["load_cv"] == pytest.approx(0.5)
    assert out["load_max_over_mean"] == pytest.approx(1.5)


def test_router_entropy_uniform_and_one_hot():
    assert diag.router_entropy(torch.full((3, 4), 0.25)) == pytest.approx(math.log(4))
    assert diag.router_entropy(torch.tensor([[1.0, 0.0, 0.0]])) == pytest.approx(0.0)
    # Mean over tokens: log 2 and 0.
    mixed = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert diag.router_entropy(mixed) == pytest.approx(math.log(2) / 2)


def test_ranking_spearman_identical_reversed_and_partial():
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert diag.ranking_spearman(a, a * 2) == pytest.approx(1.0)
    assert diag.ranking_spearman(a, a.flip(-1)) == pytest.approx(-1.0)
    # Swap the top two: ranks (0,1,2,3) vs (0,1,3,2): rho = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 12/60.
    b = torch.tensor([[0.1, 0.2, 0.4, 0.3]])
    assert diag.ranking_spearman(a, b) == pytest.approx(0.8)
    # Mean over tokens.
    assert diag.ranking_spearman(torch.cat([a, a]), torch.cat([a, b])) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="shapes differ"):
        diag.ranking_spearman(a, torch.cat([a, a]))


def test_containment_counts_tokens_whose_set_is_nested():
    k1 = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    k2 = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    # Token 0 and 2 nested, token 1 not.
    assert diag.containment(k1, k2) == pytest.approx(2 / 3)
    assert diag.containment(k2, k2) == 1.0


def test_cooccurrence_distance():
    a = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1], [1, 0, 1]], dtype=torch.bool)
    assert diag.cooccurrence_distance(a, a) == 0.0
    # C_a has ones at (0,0),(0,1),(1,0),(1,1); C_b at (0,0),(0,2),(2,0),(2,2): 6 entries differ by 1.
    assert diag.cooccurrence_distance(a, b) == pytest.approx(math.sqrt(6))
