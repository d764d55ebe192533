"""collect_moe_metrics: Megatron's per-layer aux-loss tracker, filled the way the routers fill it
(``save_to_aux_losses_tracker`` once per layer and micro-batch), reduced to per-layer means.

Single process: the tracker's per-layer sums divided by the number of micro-batches. The
data-parallel average and the reduce-group SUM are checked with a stand-in for
``torch.distributed`` whose other rank holds known values.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    get_moe_layer_wise_logging_tracker,
    save_to_aux_losses_tracker,
)

from megatron_elastic.training import metrics
from megatron_elastic.config import Config
from megatron_elastic.training.metrics import Logger, collect_moe_metrics


@pytest.fixture(autouse=True)
def empty_tracker():
    get_moe_layer_wise_logging_tracker().clear()
    yield
    get_moe_layer_wise_logging_tracker().clear()


def _fill(reduce_group=None, reduce_group_has_dp=False):
    """Two layers, two micro-batches: load balancing (0.25, 0.5) + (0.75, 1.5); k (2, 1) + (4, 3)."""
    for lb, k in (((0.25, 0.5), (2, 1)), ((0.75, 1.5), (4, 3))):
        for layer in (1, 2):
            save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(lb[layer - 1]), layer, 2,
                                       reduce_group=reduce_group, reduce_group_has_dp=reduce_group_has_dp)
            save_to_aux_losses_tracker("k", torch.tensor(float(k[layer - 1])), layer, 2)


def test_single_process_means_over_microbatches(one_process_parallel):
    _fill()
    out = collect_moe_metrics(num_microbatches=2)
    assert list(out) == ["k", "load_balancing_loss"]  # sorted names
    assert out == {"k": [3.0, 2.0], "load_balancing_loss": [0.5, 1.0]}
    # the tracker is cleared: the next step starts from zero
    assert collect_moe_metrics(num_microbatches=2) == {"k": [0.0, 0.0], "load_balancing_loss": [0.0, 0.0]}


def test_reduce_group_of_one_and_zero_microbatches(one_process_parallel):
    from megatron.core import parallel_state as ps

    _fill(reduce_group=ps.get_tensor_model_parallel_group())
    assert collect_moe_metrics(num_microbatches=0) == {"k": [6.0, 4.0], "load_balancing_loss": [1.0, 2.0]}


class FakeDist:
    """Two data-parallel ranks; the other rank's tracker holds ``peer`` (per reduction group);
    ``peer_names``: the names another pipeline stage's tracker holds (with their lengths)."""

    def __init__(self, peer, peer_names=None):
        self.peer, self.calls = peer, []
        self.peer_names = peer_names or {}

    def all_gather_object(self, out, obj, group=None):
        out[0], out[1] = obj, self.peer_names

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return 2

    def all_reduce(self, tensor, group=None):
        self.calls.append(group)
        tensor.add_(torch.tensor(self.peer[group]))


def _fake(monkeypatch, peer, pp_size=1, peer_names=None):
    fake = FakeDist(peer, peer_names)
    monkeypatch.setattr(metrics, "dist", fake)
    monkeypatch.setattr(metrics, "ps", SimpleNamespace(
        get_data_parallel_group=lambda **_: "dp",
        get_pipeline_model_parallel_world_size=lambda: pp_size,
        get_pipeline_model_parallel_group=lambda: "pp"))
    return fake


def test_data_parallel_average(monkeypatch):
    fake = _fake(monkeypatch, {"dp": [3.0, 1.0]})  # the other rank's per-layer sums
    save_to_aux_losses_tracker("z_loss", torch.tensor(1.0), 1, 2)
    save_to_aux_losses_tracker("z_loss", torch.tensor(5.0), 2, 2)
    # (mine + other) / dp_size / micro-batches = ([1, 5] + [3, 1]) / 2 / 2
    assert collect_moe_metrics(num_microbatches=2) == {"z_loss": [1.0, 1.5]}
    assert fake.calls == ["dp"]


def test_reduce_group_is_summed_then_averaged_over_dp_unless_it_contains_dp(monkeypatch):
    fake = _fake(monkeypatch, {"tp": [1.0], "dp": [10.0], "tpdp": [2.0]})
    save_to_aux_losses_tracker("a", torch.tensor(4.0), 1, 1, reduce_group="tp")
    save_to_aux_losses_tracker("b", torch.tensor(4.0), 1, 1, reduce_group="tpdp", reduce_group_has_dp=True)
    out = collect_moe_metrics(num_microbatches=1)
    assert out["a"] == [pytest.approx((4.0 + 1.0 + 10.0) / 2)]  # SUM over tp, then DP mean
    assert out["b"] == [pytest.approx(4.0 + 2.0)]  # the group already spans DP: SUM only
    assert fake.calls == ["tp", "dp", "tpdp"]


def test_progress_line_leaves_dense_layers_out_of_k_and_loss_means(capsys):
    """Megatron's tracker has a slot per layer; dense layers (no router) leave theirs at 0, which
    is neither a k nor a loss."""
    cfg = Config.from_dict({"model": {"num_layers": 3, "moe_layer_freq": [1, 0, 1], "ffn_hidden_size": 32},
                            "logging": {"tensorboard_dir": None}}).validate()
    logger = Logger(cfg, rank=0)
    stats = {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0}
    logger.train_step(1, stats, {"k": [2.0, 0.0, 1.0], "load_balancing_loss": [0.3, 0.0, 0.1]})
    line = capsys.readouterr().out
    assert "| k 2,1 |" in line and "load_balancing_loss 0.2" in line


def test_pipeline_stages_fill_their_own_layers_and_are_summed(monkeypatch):
    """Stage 0 holds layer 1 and logged z_loss; stage 1 holds layer 2 and logged z_loss and a
    name stage 0 never logged: every name is summed over the pipeline group, the missing one
    from zeros, in the same (sorted) order on every stage."""
    fake = _fake(monkeypatch, {"dp": [0.0, 0.0], "pp": [0.0, 6.0]}, pp_size=2,
                 peer_names={"z_loss": 2, "only_there": 2})
    save_to_aux_losses_tracker("z_loss", torch.tensor(2.0), 1, 2)
    out = collect_moe_metrics(num_microbatches=1)
    assert out == {"only_there": [0.0, 6.0], "z_loss": [1.0, 6.0]}  # ([2, 0] + dp [0, 0]) / 2 + pp
    assert fake.calls == ["pp", "dp", "pp"]
