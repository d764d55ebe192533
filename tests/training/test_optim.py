"""The learning-rate schedule and the CPU optimizer's global gradient norm, against hand values.

``lr_at`` with lr = 1, min_lr = 0.1, 4 warmup iterations and decay over iterations 4..14:
warmup gives (i + 1) / 4; cosine gives 0.1 + 0.9 * (cos(pi * r) + 1) / 2 with r = (i - 4) / 10
(so 0.55 halfway); linear gives 0.1 + 0.9 * (1 - r); constant stays at 1 after warmup.

``global_grad_norm`` counts replicated (dense) gradients once, sums tensor-parallel shards over
the TP group and expert gradients over the expert(-tensor)-model-parallel group; the grouping is
checked with a stand-in for ``torch.distributed`` that plays the other rank.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_elastic.config import Config
from megatron_elastic.training import optim
from megatron_elastic.training.optim import global_grad_norm, lr_at


def schedule(style: str, **extra) -> Config:
    values = {"train.lr": 1.0, "train.min_lr": 0.1, "train.lr_warmup_iters": 4, "train.train_iters": 14,
              "train.lr_decay_style": style, **extra}
    return Config().apply_overrides([f"{k}={v}" for k, v in values.items()]).validate()


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_the_first_step(style):
    cfg = schedule(style)
    assert [lr_at(cfg, i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(cfg, 4) == pytest.approx(1.0)


def test_cosine_decay():
    cfg = schedule("cosine")
    assert lr_at(cfg, 9) == pytest.approx(0.55)  # halfway: cos(pi/2) = 0
    assert lr_at(cfg, 6) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(0.2 * math.pi) + 1))  # 0.914058
    assert lr_at(cfg, 6) == pytest.approx(0.9140576, abs=1e-7)
    assert lr_at(cfg, 14) == pytest.approx(0.1)
    assert lr_at(cfg, 100) == pytest.approx(0.1)  # past the end: stays at min_lr


def test_linear_decay():
    cfg = schedule("linear")
    assert [lr_at(cfg, i) for i in (4, 6, 9, 14, 20)] == pytest.approx([1.0, 0.82, 0.55, 0.1, 0.1])


def test_constant_after_warmup():
    cfg = schedule("constant")
    assert [lr_at(cfg, i) for i in (4, 9, 14, 1000)] == [1.0, 1.0, 1.0, 1.0]


def test_decay_span_is_lr_decay_iters_when_set():
    cfg = schedule("linear", **{"train.lr_decay_iters": 24})  # decays over 4..24
    assert [lr_at(cfg, i) for i in (14, 24)] == pytest.approx([0.55, 0.1])


def test_no_warmup_starts_at_lr():
    cfg = schedule("cosine", **{"train.lr_warmup_iters": 0, "train.train_iters": 10})
    assert [lr_at(cfg, i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.55, 0.1])


# ----------------------------------------------------------------------------- gradient norm
def _param(grad, main_grad=None, **attrs) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad, dtype=torch.float32)
    if main_grad is not None:
        p.main_grad = torch.tensor(main_grad, dtype=torch.float32)
    for name, value in attrs.items():
        setattr(p, name, value)
    return p


def _params():
    """dense |g|^2 = 4, TP-sharded 1 + 4 + 4 = 9, expert (main_grad wins over grad) 4 + 16 + 16 = 36."""
    no_grad = torch.nn.Parameter(torch.ones(3))
    return [
        _param([2.0]),
        _param([1.0, 2.0, 2.0], tensor_model_parallel=True),
        _param([100.0, 100.0, 100.0], main_grad=[2.0, 4.0, 4.0], allreduce=False),
        no_grad,
    ]


def test_global_grad_norm_single_process(one_process_parallel):
    assert global_grad_norm(_params()) == pytest.approx(7.0)  # sqrt(4 + 9 + 36)
    assert global_grad_norm([]) == 0.0


class FakeDist:
    """Plays a second rank whose every partial sum equals this rank's (all_reduce doubles)."""

    def __init__(self):
        self.reduced = []

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return 2

    def all_reduce(self, tensor, group=None):
        self.reduced.append((group, float(tensor)))
        tensor.mul_(2)


def _fake_groups(monkeypatch, tp, pp=1):
    fake = FakeDist()
    monkeypatch.setattr(optim, "dist", fake)
    monkeypatch.setattr(optim, "ps", SimpleNamespace(
        get_tensor_model_parallel_world_size=lambda: tp,
        get_tensor_model_parallel_group=lambda: "tp",
        get_expert_tensor_and_model_parallel_group=lambda: "expert",
        get_pipeline_model_parallel_world_size=lambda: pp,
        get_pipeline_model_parallel_group=lambda: "pp",
    ))
    return fake


def test_grad_norm_sums_the_stages_of_a_pipeline(monkeypatch):
    """Each stage holds other layers: its total (after the in-stage reductions) is summed over
    the pipeline group; the other stage here holds as much again."""
    fake = _fake_groups(monkeypatch, tp=2, pp=2)
    norm = global_grad_norm(_params())
    assert fake.reduced == [("tp", 9.0), ("expert", 36.0), ("pp", 4 + 2 * 9 + 2 * 36)]
    assert norm == pytest.approx(math.sqrt(2 * (4 + 2 * 9 + 2 * 36)))


@pytest.mark.parametrize("tp", [1, 2])
def test_grad_norm_groups_tp_shards_and_experts(monkeypatch, tp):
    fake = _fake_groups(monkeypatch, tp)
    norm = global_grad_norm(_params())
    if tp == 2:
        # TP shards summed over TP, experts over the expert group, dense counted once
        assert fake.reduced == [("tp", 9.0), ("expert", 36.0)]
        assert norm == pytest.approx(math.sqrt(4 + 2 * 9 + 2 * 36))
    else:
        # TP = 1: a "tensor_model_parallel" parameter is whole on every rank, i.e. dense
        assert fake.reduced == [("expert", 36.0)]
        assert norm == pytest.approx(math.sqrt(4 + 9 + 2 * 36))
