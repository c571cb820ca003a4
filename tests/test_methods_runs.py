"""Two sites, two rounds of FCL, local CL and FedSimCLR in process, on a tiny phantom."""

import json
import math

import numpy as np
import pytest
import torch

from fedcontrast.methods.base import message_to_state_dict, select
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.fedcrld import DEFAULTS as FEDCRLD_DEFAULTS
from fedcontrast.methods.fedmotion import DEFAULTS as MOTION_DEFAULTS
from fedcontrast.methods.fedprox import DEFAULT_MU
from fedcontrast.methods.partitions import site_tag
from fedcontrast.methods.pretrain import lr_factor
from fedcontrast.methods.registry import available_methods, get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.presets import network_preset

SITES = ("site-1", "site-2")
TINY_BUNDLE = network_preset("tiny", roi_size=[32, 32])
CONFIG = {
    "bundle": TINY_BUNDLE,
    "batch_size": 2,
    "head_hidden": 32,
    "embedding_dim": 16,
    "features_per_partition": 3,
    "local_samples": 2,
    "remote_samples": 2,
    "seed": 3,
}


@pytest.fixture(scope="module")
def datalists(phantom_images) -> dict[str, list[dict]]:
    return phantom_images(2)


def strip(entries: dict, prefix: str) -> dict:
    """The entries whose key starts with ``prefix``, prefix removed."""
    return {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}


def initial_encoder(method: str) -> dict[str, torch.Tensor]:
    return strip(message_to_state_dict(get_method(method).trainer.initial_message(CONFIG)), "encoder.")


def encoder_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_fcl_two_sites_two_rounds(datalists, monkeypatch):
    received: list[tuple[int, str, list[int]]] = []
    original = FCLTrainer.local_round

    def spy(self, incoming, round_num):
        tags = incoming.get("features/sites", np.array([], dtype=np.int64))
        received.append((round_num, self.site, sorted(set(tags.tolist()))))
        return original(self, incoming, round_num)

    monkeypatch.setattr(FCLTrainer, "local_round", spy)
    result = run_in_process("fcl", CONFIG, datalists, rounds=2)

    # round 0 has no remote features; in round 1 each site holds exactly the other site's
    assert received == [
        (0, "site-1", []),
        (0, "site-2", []),
        (1, "site-1", [site_tag("site-2")]),
        (1, "site-2", [site_tag("site-1")]),
    ]
    for record in result.history:
        assert all(math.isfinite(v) for v in record["metrics"].values())
        assert record["metrics"]["loss_local"] > 0
        assert (record["metrics"]["loss_remote"] > 0) == (record["round"] == 1)
        assert record["bytes_up"]["features"] > 0
    before = initial_encoder("fcl")
    for site in SITES:
        assert encoder_changed(before, result.encoders[site])
        build_network(overrides=TINY_BUNDLE).encoder.load_state_dict(result.encoders[site])
        # the upload: weights under encoder./head. names, 16-d unit features with partition ids, nothing else
        message = result.final_messages[site]
        weights = select(message, "weights")
        head = strip(weights, "head.")
        assert head and set(weights) == {"encoder." + k for k in before} | {"head." + k for k in head}
        features = select(message, "features")
        assert set(features) == {"embeddings", "partitions"}
        # 2 patients x (ED, ES) = 4 volumes; K = 3 per partition; S = 4
        assert features["embeddings"].shape == (12, 16) and features["embeddings"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(features["embeddings"], axis=1), 1.0, rtol=1e-5)
        assert sorted(np.bincount(features["partitions"]).tolist()) == [3, 3, 3, 3]
        assert {k.split("/", 1)[0] for k in message} == {"weights", "features"}


def test_local_cl_trains_each_site_alone(datalists):
    spec = get_method("local_cl")
    assert not spec.federated
    result = run_in_process("local_cl", CONFIG, datalists, rounds=2)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in result.history)
    before = initial_encoder("local_cl")
    assert all(encoder_changed(before, result.encoders[s]) for s in SITES)
    assert encoder_changed(result.encoders["site-1"], result.encoders["site-2"])
    assert result.global_message == {}
    assert all(set(m) == {k for k in m if k.startswith("weights/")} for m in result.final_messages.values())


def test_local_cl_is_deterministic_for_a_seed(datalists):
    one = {"site-1": datalists["site-1"]}
    a = run_in_process("local_cl", {**CONFIG, "loss_strategy": "G^D-"}, one, rounds=1)
    b = run_in_process("local_cl", {**CONFIG, "loss_strategy": "G^D-"}, one, rounds=1)
    metrics_a, metrics_b = (
        {k: v for k, v in r.history[0]["metrics"].items() if k != "samples_per_s"} for r in (a, b)
    )
    assert metrics_a == metrics_b
    assert not encoder_changed(a.encoders["site-1"], b.encoders["site-1"])


def test_fedsimclr_averages_encoder_and_head(datalists):
    spec = get_method("fedsimclr")
    assert spec.federated and spec.trainer.DEFAULTS["loss_strategy"] == "G^R"
    result = run_in_process("fedsimclr", CONFIG, datalists, rounds=2)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in result.history)
    assert all(r["bytes_up"]["features"] == 0 and r["bytes_up"]["weights"] > 0 for r in result.history)
    before = initial_encoder("fedsimclr")
    average = strip(result.global_message, "weights/encoder.")
    assert encoder_changed(before, {k: torch.as_tensor(v) for k, v in average.items()})
    key = next(k for k in average if k.endswith("conv_init.weight"))
    expected = (result.encoders["site-1"][key] + result.encoders["site-2"][key]) / 2  # equal sample counts
    np.testing.assert_allclose(average[key], expected.numpy(), rtol=1e-5, atol=1e-7)


def test_volumes_with_fewer_slices_than_partitions_are_named(datalists):
    # the small phantom has 7 to 9 slices per volume
    with pytest.raises(ValueError, match=r"fewer slices than partitions=12 .*\.nii\.gz"):
        FCLTrainer({**CONFIG, "partitions": 12}, datalists["site-1"], "site-1")


@pytest.mark.parametrize("method, key", [("fcl", "preprocessing"), ("supervised", "network")])
def test_old_override_keys_are_refused_naming_bundle(method, key):
    with pytest.raises(ValueError, match=rf"\['{key}'\] were folded into one 'bundle' dict"):
        get_method(method).trainer.initial_message({key: TINY_BUNDLE})


def test_pretraining_budget_schedule_and_diagnostics(datalists):
    # 3 steps a round whatever the number of volumes; the learning rate warms up, then decays
    # along the cosine; every round reports the diagnostics.
    config = {**CONFIG, "local_steps": 3, "rounds": 2, "warmup_fraction": 0.5, "probe_volumes": 4}
    result = run_in_process("fedsimclr", config, {"site-1": datalists["site-1"]}, rounds=2)
    metrics = [r["metrics"] for r in result.history]
    assert [m["steps"] for m in metrics] == [3.0, 3.0]
    # 6 steps, 3 of warm-up: round 0 ends at the peak, round 1 at step 5 (cosine at 2/3: 0.25)
    assert metrics[0]["lr"] == 1e-3 and math.isclose(metrics[1]["lr"], 0.25e-3)
    for m in metrics:
        assert -4.5 < m["uniformity"] <= 0.0 and 0.0 <= m["alignment"] <= 4.0
        assert 0.0 <= m["partition_accuracy"] <= 1.0 and m["samples_per_s"] > 0


def test_lr_factor_warms_up_then_follows_the_cosine():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert math.isclose(lr_factor(6, 10, 2), 0.5) and lr_factor(10, 10, 2) == 0.0
    assert lr_factor(5, 0, 0) == 1.0


def test_pretraining_starts_from_an_initial_encoder_file_with_seeded_heads(tmp_path):
    from fedcontrast.nets.bundle import encoder_options, save_encoder

    seeded = message_to_state_dict(FCLTrainer.initial_message(CONFIG), "weights")
    other = message_to_state_dict(FCLTrainer.initial_message({**CONFIG, "seed": 4}), "weights")
    options = encoder_options(None, TINY_BUNDLE)
    save_encoder(strip(other, "encoder."), tmp_path / "encoder_s3.pt", options)  # CONFIG's seed is 3

    started = FCLTrainer.initial_message({**CONFIG, "initial_encoder": str(tmp_path / "encoder_s{seed}.pt")})
    started = message_to_state_dict(started, "weights")
    assert started.keys() == seeded.keys()
    for key, value in started.items():
        assert torch.equal(value, other[key] if key.startswith("encoder.") else seeded[key]), key

    save_encoder(strip(other, "encoder."), tmp_path / "other_grid.pt", {**options, "inplane_spacing": 9.0})
    with pytest.raises(ValueError, match="inplane_spacing"):
        FCLTrainer.initial_message({**CONFIG, "initial_encoder": str(tmp_path / "other_grid.pt")})


def test_every_method_declares_the_defaults_its_trainer_merges():
    # the benchmark records them per run folder: a default not declared could change unseen
    for name in available_methods():
        spec = get_method(name)
        assert spec.defaults and json.dumps(spec.defaults, allow_nan=False), name  # recordable as JSON
    assert get_method("fedprox").defaults["mu"] == DEFAULT_MU
    assert get_method("fedmotion").defaults["phase_bins"] == MOTION_DEFAULTS["phase_bins"]
    assert get_method("fedcrld").trainer.DEFAULTS is FEDCRLD_DEFAULTS
