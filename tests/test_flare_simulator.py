"""The two jobs, end to end in the NVFlare simulator, with 2 sites of tiny phantom volumes.

- ``jobs/fcl``: on the messages the server actually sent and received, each site gets only
  the other site's features, and nothing shaped like an image or a feature map leaves a site
  (:func:`audit_upload`, the outbound audit every method's job test applies);
- ``jobs/fcl --method fedmoco``: each site gets the other site's intensity statistics, each
  site's RSA rho reaches the server, and nothing else new leaves a site.
- ``jobs/finetune``: the global model segments the sites' test volumes better than the
  untrained network.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import job_module, recorded_message

from fedcontrast.methods.base import kind_of, merge_config, message_to_state_dict
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.metadata import STATS_ENTRIES
from fedcontrast.methods.partitions import site_tag
from fedcontrast.methods.registry import get_method
from fedcontrast.nets.bundle import build_network, bundle_workflow, encoder_options, load_pretrained_encoder
from fedcontrast.nets.presets import network_preset

pytestmark = pytest.mark.simulator

SITES = ("site-1", "site-2")
#: The bundle network shrunk for the small phantom (about 3.3 mm pixels, 7-9 slices).
TINY_BUNDLE = network_preset("tiny_phantom")


#: Most numbers one ``stats/`` entry may carry out of a site (FedMoCo's coarse histogram; else scalars).
MAX_STATS_VALUES = 64


def audit_upload(up: dict[str, np.ndarray], model: dict[str, torch.Tensor]) -> None:
    """What left a site holds nothing shaped like an image or a feature map: the model's weights (every
    entry, each with its shape), 128-d feature rows and their integer tags, and ``stats/`` entries of at
    most :data:`MAX_STATS_VALUES` numbers in at most one axis."""
    weights = {}
    for key, value in up.items():
        kind, name = key.split("/", 1)
        if kind == "weights":
            weights[name] = value
        elif kind == "features":
            rows = value.ndim == 2 and value.shape[1] == 128 and np.issubdtype(value.dtype, np.floating)
            tags = value.ndim == 1 and np.issubdtype(value.dtype, np.integer)
            assert rows or tags, (key, value.shape, value.dtype)
        else:
            assert kind == "stats" and value.ndim <= 1 and value.size <= MAX_STATS_VALUES, (key, value.shape)
    assert weights.keys() == model.keys()
    assert all(weights[k].shape == tuple(model[k].shape) for k in model)


def test_fcl_job_exchanges_only_other_sites_features(site_splits, tiny_fcl_config, tmp_path):
    workspace, output = tmp_path / "ws", tmp_path / "out"
    code = job_module("fcl").main(
        ["--datalist-dir", str(site_splits), "--rounds", "2", "--workspace", str(workspace),
         "--output", str(output), "--record-messages", "--feature-clip", "0.5",
         "--config", json.dumps(tiny_fcl_config)]
    )  # fmt: skip
    assert code == 0
    result = workspace / "server" / "simulate_job"
    model = FCLTrainer.build_model(merge_config(FCLTrainer.DEFAULTS, tiny_fcl_config)).state_dict()

    for site in SITES:
        # each site ran as itself, in one worker that kept its trainer (built once) for both rounds
        site_log = (workspace / site / "log.txt").read_text()
        assert site_log.count(": datalist ") == 1 and f"{site}: datalist " in site_log
        (other,) = set(SITES) - {site}
        assert not any(kind_of(k) == "features" for k in recorded_message(result, 0, site, "down"))
        down = recorded_message(result, 1, site, "down")
        assert set(down["features/sites"].tolist()) == {site_tag(other)}
        sent_by_other = recorded_message(result, 0, other, "up")
        for name in ("embeddings", "partitions"):
            np.testing.assert_array_equal(down[f"features/{name}"], sent_by_other[f"features/{name}"])

        for round_num in (0, 1):
            up = recorded_message(result, round_num, site, "up")
            audit_upload(up, model)
            features = {k: v for k, v in up.items() if kind_of(k) == "features"}
            assert features.keys() == {"features/embeddings", "features/partitions"}
            assert set(up) == set(features) | {f"weights/{k}" for k in model}
            embeddings, partitions = features["features/embeddings"], features["features/partitions"]
            assert embeddings.ndim == 2 and embeddings.shape[1] == 128 and embeddings.dtype == np.float32
            assert partitions.shape == embeddings.shape[:1] and partitions.dtype == np.int64
            # the privacy filter ran on the site's result before it left (FCL's keys are unit-norm)
            np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 0.5, rtol=1e-4)

    ledger = json.loads((output / "bytes.json").read_text())
    uploads = [recorded_message(result, r, s, "up") for s in SITES for r in (0, 1)]
    up_features = sum(v.nbytes for up in uploads for k, v in up.items() if kind_of(k) == "features")
    assert ledger["totals"]["up"]["features"] == up_features
    assert {(r["round"], r["site"], r["direction"]) for r in ledger["records"]} == {
        (r, s, d) for r in (0, 1) for s in SITES for d in ("down", "up")
    }
    records = json.loads((output / "metrics.json").read_text())["records"]
    metrics = [m for m in records if m["site"] != "server"]
    assert len(metrics) == 4 and all(m["metrics"]["loss_remote"] > 0 for m in metrics if m["round"] == 1)
    # the server times every round: the slowest site's training and what the federation added
    timing = [m["metrics"] for m in records if m["site"] == "server"]
    assert len(timing) == 2 and all(0 < t["site_train_s"] < t["round_s"] for t in timing)
    assert all(t["overhead_s"] == pytest.approx(t["round_s"] - t["site_train_s"]) for t in timing)
    network = build_network(overrides=tiny_fcl_config["bundle"])
    assert load_pretrained_encoder(
        network, output / "pretrained_encoder.pt", encoder_options(overrides=tiny_fcl_config["bundle"])
    )


def test_fedmoco_job_forwards_statistics_and_reports_rsa(site_splits, tiny_fcl_config, tmp_path):
    config = {k: tiny_fcl_config[k] for k in ("bundle", "batch_size", "head_hidden")}
    config["queue_size"] = 16
    workspace, output = tmp_path / "ws", tmp_path / "out"
    code = job_module("fcl").main(
        ["--method", "fedmoco", "--datalist-dir", str(site_splits), "--rounds", "2", "--workspace",
         str(workspace), "--output", str(output), "--record-messages", "--config", json.dumps(config)]
    )  # fmt: skip
    assert code == 0
    result = workspace / "server" / "simulate_job"
    trainer = get_method("fedmoco").trainer
    model = trainer.build_model(merge_config(trainer.DEFAULTS, config)).state_dict()
    meta = {f"stats/{name}" for name in STATS_ENTRIES}
    server = {
        m["round"]: m["metrics"]
        for m in json.loads((output / "metrics.json").read_text())["records"]
        if m["site"] == "server"
    }
    assert sorted(server) == [0, 1]
    for site in SITES:
        (other,) = set(SITES) - {site}
        # round 0: weights only; round 1: plus the other site's statistics of round 0, tagged with it
        assert all(kind_of(k) == "weights" for k in recorded_message(result, 0, site, "down"))
        down = recorded_message(result, 1, site, "down")
        assert {k for k in down if kind_of(k) != "weights"} == {*meta, "stats/meta_sites"}
        assert down["stats/meta_sites"].tolist() == [site_tag(other)]
        sent_by_other = recorded_message(result, 0, other, "up")
        for key in meta:
            np.testing.assert_array_equal(down[key][0], sent_by_other[key])
        for round_num in (0, 1):
            up = recorded_message(result, round_num, site, "up")
            audit_upload(up, model)
            # nothing new leaves a site but its statistics and its rho, which reaches the server
            assert set(up) == {f"weights/{k}" for k in model} | meta | {"stats/rsa_rho"}
            assert server[round_num][f"rsa_rho/{site}"] == pytest.approx(float(up["stats/rsa_rho"]))
    for metrics in server.values():
        assert sum(metrics[f"rsa_weight/{s}"] for s in SITES) == pytest.approx(1.0)
    ledger = json.loads((output / "bytes.json").read_text())
    assert ledger["totals"]["up"]["features"] == 0 and ledger["totals"]["up"]["stats"] > 0
    network = build_network(overrides=config["bundle"])
    assert load_pretrained_encoder(
        network, output / "pretrained_encoder.pt", encoder_options(overrides=config["bundle"])
    )


def mean_test_dice(checkpoint: Path, splits: Path, out_dir: Path) -> float:
    """Mean foreground Dice of ``checkpoint`` on both sites' test volumes, by the bundle's evaluate config."""
    overrides = {
        **TINY_BUNDLE,
        "datalist": [str(splits / f"{site}.json") for site in SITES],
        "ckpt_path": str(checkpoint),
        "output_dir": str(out_dir),
        "num_workers": 0,
        "device": torch.device("cpu"),
    }
    workflow = bundle_workflow(None, "evaluate", overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads((out_dir / "summary.json").read_text())["dice"]["mean"]


def test_fedmotion_job_sends_only_weights_and_hands_over_its_encoder(site_splits, tmp_path):
    """The motion pretext through NVFlare: each site makes its masks from its own frames, only
    weights leave it, and its encoder lands in ``pretrained_encoder.pt`` for fine-tuning; the
    network predicts still and moving, so no segmentation model is exported."""
    workspace, output = tmp_path / "ws", tmp_path / "out"
    config = {"bundle": TINY_BUNDLE, "local_steps": 2}
    code = job_module("fcl").main(
        ["--method", "fedmotion", "--datalist-dir", str(site_splits), "--rounds", "2", "--batch-size", "2",
         "--workspace", str(workspace), "--output", str(output), "--record-messages",
         "--config", json.dumps(config)]
    )  # fmt: skip
    assert code == 0
    result = workspace / "server" / "simulate_job"
    model = message_to_state_dict(get_method("fedmotion").trainer.initial_message(config))
    for site, round_num in itertools.product(SITES, (0, 1)):
        up = recorded_message(result, round_num, site, "up")
        audit_upload(up, model)
        assert all(kind_of(k) == "weights" for k in up)
    network, options = build_network(overrides=TINY_BUNDLE), encoder_options(overrides=TINY_BUNDLE)
    assert load_pretrained_encoder(network, output / "pretrained_encoder.pt", options)
    assert not (output / "global_model.pt").exists()


def test_finetune_job_beats_the_untrained_network(site_splits, tmp_path):
    workspace, output = tmp_path / "ws", tmp_path / "out"
    code = job_module("finetune").main(
        ["--datalist-dir", str(site_splits), "--rounds", "3", "--local-epochs", "10", "--lr", "0.01",
         "--workspace", str(workspace), "--output", str(output),
         "--config", json.dumps({"bundle": TINY_BUNDLE})]
    )  # fmt: skip
    assert code == 0
    records = json.loads((output / "metrics.json").read_text())["records"]
    metrics = [m for m in records if m["site"] != "server"]
    assert [(m["round"], m["site"]) for m in metrics] == [(r, s) for r in range(3) for s in SITES]
    assert all(0.0 <= m["metrics"]["val_dice"] <= 1.0 for m in metrics)
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))

    untrained = tmp_path / "untrained.pt"
    initial = get_method("supervised").trainer.initial_message({"bundle": TINY_BUNDLE, "seed": 0})
    torch.save(message_to_state_dict(initial), untrained)
    before = mean_test_dice(untrained, site_splits, tmp_path / "eval-untrained")
    after = mean_test_dice(output / "global_model.pt", site_splits, tmp_path / "eval-global")
    assert after > before + 0.03, (before, after)
