"""PTNU and DP: the prediction, the upload and correction rules, on the server and at the sites."""

import math

import numpy as np
import pytest
import torch

from fedcontrast.methods.base import SiteUpdate, count_bytes, select, weighted_average
from fedcontrast.methods.fclopt import FCLOptPTNUDPTrainer, FCLOptPTNUStrategy, FCLOptTrainer
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.target_sync import (
    TargetSync,
    ema_factor,
    fold_targets,
    needs_correction,
    predict_target,
    predicted_distance,
    relative_distance,
    should_upload,
)

SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def datalists(phantom_images) -> dict[str, list[dict]]:
    return phantom_images(1)


def state(value: float, counter: int = 0) -> dict[str, np.ndarray]:
    """A tiny target-like state: two float entries and a BatchNorm-like counter."""
    return {
        "encoder.w": np.full(4, value, dtype=np.float32),
        "encoder.bn.num_batches_tracked": np.array(counter, dtype=np.int64),
        "head.b": np.full(2, value, dtype=np.float32),
    }


# ---- the maths -------------------------------------------------------------------------------------


def test_predict_target_is_the_ema_formula():
    rng = np.random.default_rng(0)
    target = {"encoder.w": rng.normal(size=(3, 5)).astype(np.float32), "encoder.n": np.array(2, np.int64)}
    online = {
        "encoder.w": rng.normal(size=(3, 5)).astype(np.float32),
        "encoder.n": np.array(7, dtype=np.int64),
        "predictor.w": np.ones(2, dtype=np.float32),
    }
    before = {k: v.copy() for k, v in target.items()}
    factor = ema_factor(0.9, 3)
    assert factor == 0.9**3 and ema_factor(0.9, 0) == 1.0
    predicted = predict_target(target, online, factor)
    assert set(predicted) == set(target)
    xi, theta = target["encoder.w"].astype(np.float64), online["encoder.w"].astype(np.float64)
    expected = factor * xi + (1 - factor) * theta
    assert predicted["encoder.w"].dtype == np.float32
    assert np.array_equal(predicted["encoder.w"], expected.astype(np.float32))
    assert predicted["encoder.n"] == 7  # counters follow the online network, as in ema_update
    assert all(np.array_equal(target[k], before[k]) for k in target)
    # the same as n EMA steps towards a constant online network
    for _ in range(3):
        xi = 0.9 * xi + 0.1 * theta
    np.testing.assert_allclose(predicted["encoder.w"], xi, rtol=1e-6)


def test_relative_distance_and_predicted_distance():
    b = {**state(2.0, counter=3), "encoder.bn.running_var": np.ones(2, np.float32)}
    a = {
        **state(2.0, counter=99),
        "encoder.w": np.array([2.0, 2.0, 2.0, 5.0], dtype=np.float32),
        "encoder.bn.running_var": np.full(2, 50.0, np.float32),
    }
    # BatchNorm statistics and counters are left out
    assert relative_distance(a, b) == pytest.approx(3.0 / math.sqrt(6 * 4.0))
    assert relative_distance(b, b) == 0.0
    assert relative_distance(b, state(0.0)) == math.inf
    assert predicted_distance(a, b, site_factor=0.75) == pytest.approx(0.25 * 3.0 / math.sqrt(24.0))


@pytest.mark.parametrize(
    ("distance", "round_num", "sync_every", "expected"),
    [
        (0.02, 0, 5, True),  # above δ
        (0.005, 0, 5, False),  # below δ
        (0.01, 0, 5, False),  # at δ: not above
        (0.005, 4, 5, True),  # the T-th round (0-based round T-1): safety sync
        (0.005, 5, 5, False),
        (0.005, 9, 5, True),  # every T rounds
        (0.0, 3, 1, True),  # T = 1: every round
    ],
)
def test_upload_rule(distance, round_num, sync_every, expected):
    assert should_upload(distance, 0.01, round_num, sync_every) is expected


def test_correction_rule():
    assert needs_correction(0.02, 0.01)
    assert not needs_correction(0.01, 0.01)
    assert not needs_correction(0.0, 0.0)


def test_fold_targets_uses_uploads_and_predicts_the_others():
    previous = state(1.0)
    uploaded = {"a": state(3.0, counter=4)}
    online = {"a": state(9.0), "b": state(5.0), "c": state(-1.0)}
    factors = {"a": 0.5, "b": 0.5, "c": 0.25}
    running, factor = fold_targets(previous, uploaded, online, factors, {"a": 1, "b": 1, "c": 2})
    # a: its upload 3; b: 0.5*1 + 0.5*5 = 3; c: 0.25*1 + 0.75*(-1) = -0.5; weights 1/4, 1/4, 1/2
    np.testing.assert_allclose(running["encoder.w"], 0.25 * 3 + 0.25 * 3 + 0.5 * -0.5)
    assert factor == pytest.approx(0.25 * 0.5 + 0.25 * 0.5 + 0.5 * 0.25)
    assert running["encoder.w"].dtype == np.float32


# ---- the server -------------------------------------------------------------------------------------


def initial_message(value: float = 1.0) -> dict[str, np.ndarray]:
    weights = {f"weights/{k}": v for k, v in {**state(value), "predictor.w": np.ones(3, np.float32)}.items()}
    return {**weights, **{f"target/{k}": v for k, v in state(value).items()}}


def update(online: float, steps: int, target: float | None = None, samples: int = 10) -> SiteUpdate:
    message = {f"weights/{k}": v for k, v in {**state(online), "predictor.w": np.ones(3, np.float32)}.items()}
    message["stats/steps"] = np.int64(steps)
    if target is not None:
        message.update({f"target/{k}": v for k, v in state(target).items()})
    return SiteUpdate(message, num_samples=samples)


def test_average_mode_sends_the_averaged_target_both_ways():
    strategy = TargetSync({}, initial_message())
    assert count_bytes(strategy.message_for("a", 0))["target"] > 0
    strategy.aggregate({"a": update(2.0, 1, target=2.0, samples=30), "b": update(4.0, 1, target=6.0)}, 0)
    message = strategy.message_for("b", 1)
    np.testing.assert_allclose(message["target/encoder.w"], 0.75 * 2.0 + 0.25 * 6.0)
    np.testing.assert_allclose(message["weights/encoder.w"], 0.75 * 2.0 + 0.25 * 4.0)
    assert "stats/ema_factor" not in message


def test_ptnu_server_never_sends_the_target_and_measures_the_prediction():
    strategy = TargetSync({"target_update": "ptnu", "momentum": 0.5}, initial_message())
    assert set(select(strategy.message_for("a", 0), "target")) == set()
    assert "stats/ema_factor" not in strategy.message_for("a", 0)
    # site a took 1 step, b 2 steps: μ = (0.5 + 0.25) / 2
    strategy.aggregate({"a": update(3.0, 1, target=2.0), "b": update(5.0, 2, target=2.5)}, 0)
    message = strategy.message_for("a", 1)
    assert count_bytes(message)["target"] == 0
    assert message["stats/ema_factor"] == pytest.approx(0.375)
    # every site will hold μ·ξ(0) + (1-μ)·θ_global = 0.375 + 0.625 * 4
    np.testing.assert_allclose(strategy.site_target["encoder.w"], 0.375 * 1 + 0.625 * 4.0)
    (log,) = strategy.sync_log
    average_real = state(2.25)
    assert log["target_gap"] == pytest.approx(relative_distance(strategy.site_target, average_real))
    assert log["uploads"] == ["a", "b"] and not log["correction"]


def test_dp_server_corrects_only_when_its_running_target_drifts_past_delta():
    config = {"target_update": "ptnu_dp", "momentum": 0.5, "delta": 0.01}
    strategy = TargetSync(config, initial_message())
    # no upload, no movement: the running target is the prediction, nothing to correct
    strategy.aggregate({"a": update(1.0, 1), "b": update(1.0, 1)}, 0)
    assert strategy.sync_log[-1]["target_gap"] == pytest.approx(0.0, abs=1e-7)
    assert count_bytes(strategy.message_for("a", 1))["target"] == 0
    # a uploads a target 1.8% off: running 1.009 vs prediction 1 -> gap 0.0089 < δ, no correction
    strategy.aggregate({"a": update(1.0, 1, target=1.018), "b": update(1.0, 1)}, 1)
    assert strategy.sync_log[-1]["target_gap"] == pytest.approx(0.009 / 1.009, rel=1e-5)
    assert not strategy.sync_log[-1]["correction"]
    assert count_bytes(strategy.message_for("a", 2))["target"] == 0
    # the same again: b's prediction now starts from the running target, which drifts to
    # 1 + 5/8 * 0.018 while the sites' prediction stays at 1 -> gap 0.0111 > δ: one correction
    strategy.aggregate({"a": update(1.0, 1, target=1.018), "b": update(1.0, 1)}, 2)
    assert strategy.sync_log[-1]["target_gap"] == pytest.approx(0.01125 / 1.01125, rel=1e-5)
    assert strategy.sync_log[-1]["correction"]
    correction = select(strategy.message_for("b", 3), "target")
    np.testing.assert_allclose(correction["encoder.w"], 1.01125, rtol=1e-6)
    assert all(np.array_equal(correction[k], strategy.site_target[k]) for k in correction)
    # once the sites hold the server's target, quiet rounds send nothing
    strategy.aggregate({"a": update(1.0, 1), "b": update(1.0, 1)}, 3)
    assert not strategy.sync_log[-1]["correction"]
    assert count_bytes(strategy.message_for("a", 4))["target"] == 0


# ---- the sites ----------------------------------------------------------------------------------------


def test_dp_site_uploads_exactly_when_the_rule_says(datalists, tiny_fclopt_config):
    config = {**tiny_fclopt_config, "delta": 0.0, "sync_every": 3}
    initial = FCLOptPTNUDPTrainer.initial_message(config)
    trainer = FCLOptPTNUDPTrainer(config, datalists["site-1"], "site-1")
    result = trainer.local_round({k: v for k, v in initial.items() if k.startswith("weights/")}, 0)
    distance = result.metrics["predicted_distance"]
    steps = int(result.message["stats/steps"])
    assert steps == result.metrics["steps"] == 1
    global_online = select(initial, "target")  # round 0: the target is θ_global's encoder and head
    online = {k: result.message[f"weights/{k}"] for k in global_online}
    assert distance == pytest.approx(predicted_distance(online, global_online, ema_factor(0.9, steps)))
    assert distance > 0 and count_bytes(result.message)["target"] > 0  # δ = 0: uploaded
    assert result.metrics["target_uploaded"] == 1
    for delta, round_num, uploads in [
        (distance * 2, 0, False),  # below δ
        (distance / 2, 0, True),  # above δ
        (distance * 2, 2, True),  # below δ, but the T-th round
        (distance * 2, 3, False),
    ]:
        trainer.config["delta"], trainer.round_num = delta, round_num
        message = trainer.target_message()
        assert bool(select(message, "target")) is uploads, (delta, round_num)
        assert trainer.sync_metrics["target_uploaded"] == float(uploads)
        assert int(message["stats/steps"]) == steps


def test_ptnu_sites_hold_bit_identical_predicted_targets(datalists, monkeypatch, tiny_fclopt_config):
    held: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    received: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    server: dict[int, dict[str, np.ndarray]] = {}
    strategies: list[TargetSync] = []
    begin, aggregate = FCLOptTrainer.begin_round, FCLOptPTNUStrategy.aggregate

    def spy_begin(self, incoming):
        begin(self, incoming)
        held[self.round_num, self.site] = {k: v.copy() for k, v in self.held_target.items()}
        received[self.round_num, self.site] = dict(incoming)

    def spy_aggregate(self, updates, round_num):
        aggregate(self, updates, round_num)
        server[round_num] = dict(self.site_target)
        strategies[:] = [self]

    monkeypatch.setattr(FCLOptTrainer, "begin_round", spy_begin)
    monkeypatch.setattr(FCLOptPTNUStrategy, "aggregate", spy_aggregate)
    rounds = 3
    # with the (optional) target upload, the server can measure the prediction against the real targets
    result = run_in_process(
        "fclopt_ptnu", {**tiny_fclopt_config, "ptnu_upload": True}, datalists, rounds=rounds
    )

    initial_target = select(get_method("fclopt_ptnu").trainer.initial_message(tiny_fclopt_config), "target")
    for r in range(rounds):
        one, two = held[r, "site-1"], held[r, "site-2"]
        assert one.keys() == two.keys() == initial_target.keys()
        assert all(np.array_equal(one[k], two[k]) for k in one), f"round {r}: sites hold different targets"
        if r == 0:
            assert all(np.array_equal(one[k], initial_target[k]) for k in one)
            continue
        incoming = received[r, "site-1"]
        factor = float(incoming["stats/ema_factor"])
        assert factor == pytest.approx(0.9 ** int(result.final_messages["site-1"]["stats/steps"]))
        expected = predict_target(held[r - 1, "site-1"], select(incoming, "weights"), factor)
        assert all(np.array_equal(one[k], expected[k]) for k in one)
        assert all(np.array_equal(one[k], server[r - 1][k]) for k in one)  # the server tracks it exactly
    for record in result.history:
        assert record["bytes_down"]["target"] == 0
        assert record["bytes_up"]["target"] > 0 and record["bytes_up"]["stats"] == 8
        assert record["bytes_down"]["stats"] == (8 if record["round"] > 0 else 0)
        # exchange "features": K = 2 volumes x S = 4 partitions of 16 floats, plus their partition ids
        assert record["bytes_up"]["features"] == 2 * 4 * (16 * 4 + 8)
        assert all(math.isfinite(v) for v in record["metrics"].values())
    # the reported gap is the prediction's distance from the average of the sites' real targets
    (strategy,) = strategies
    assert [log["round"] for log in strategy.sync_log] == list(range(rounds))
    final = {s: SiteUpdate(m, 1) for s, m in result.final_messages.items()}
    average_real = select(weighted_average(final, "target"), "target")
    last = strategy.sync_log[-1]
    assert last["target_gap"] == pytest.approx(relative_distance(server[rounds - 1], average_real))
    # and the same bookkeeping reaches the run's server metrics (metrics.json in NVFlare runs)
    assert [m["round"] for m in result.server_metrics] == list(range(rounds))
    assert result.server_metrics[-1]["target_gap"] == pytest.approx(last["target_gap"])
    assert result.server_metrics[-1]["target_uploads"] == 2  # PTNU without DP: every site uploads
    assert 0 < last["target_gap"] < 0.5 and not last["correction"]

    # by default no target leaves a site, and the sites train exactly as with the upload
    quiet = run_in_process("fclopt_ptnu", tiny_fclopt_config, datalists, rounds=2)
    assert all(r["bytes_up"]["target"] == 0 and r["bytes_down"]["target"] == 0 for r in quiet.history)
    assert all("target_gap" not in m and m["target_uploads"] == 0 for m in quiet.server_metrics)
    loud = run_in_process("fclopt_ptnu", {**tiny_fclopt_config, "ptnu_upload": True}, datalists, rounds=2)
    for site, encoder in quiet.encoders.items():
        assert all(torch.equal(encoder[k], loud.encoders[site][k]) for k in encoder)


def test_dp_corrections_reach_every_site(datalists, tiny_fclopt_config):
    config = {**tiny_fclopt_config, "exchange": "prototypes", "delta": 0.0, "sync_every": 100}
    result = run_in_process("fclopt_ptnu_dp", config, datalists, rounds=2)
    round0 = [r for r in result.history if r["round"] == 0]
    round1 = [r for r in result.history if r["round"] == 1]
    # δ = 0: every site uploads its target, the server's running target differs from the
    # prediction, so round 1 brings one correction download of the target's size
    assert all(r["bytes_up"]["target"] > 0 and r["bytes_down"]["target"] == 0 for r in round0)
    assert all(r["bytes_down"]["target"] == r["bytes_up"]["target"] for r in round1)
