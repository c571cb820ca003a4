"""The two jobs, end to end in the NVFlare simulator, with 2 sites of tiny phantom volumes.

- ``jobs/fcl``: on the messages the server actually sent and received, each site gets only
  the other site's features, and nothing shaped like an image or a feature map leaves a site.
- ``jobs/finetune``: the global model segments the sites' test volumes better than the
  untrained network.
"""

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcontrast.methods.base import kind_of, message_to_state_dict
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.partitions import site_tag
from fedcontrast.methods.pretrain import merge_config
from fedcontrast.methods.registry import get_method
from fedcontrast.nets.bundle import build_network, bundle_workflow, load_pretrained_encoder

pytestmark = pytest.mark.simulator

REPO = Path(__file__).resolve().parents[1]
SITES = ("site-1", "site-2")
#: The bundle network shrunk for the small phantom (about 3.3 mm pixels, 7-9 slices).
TINY_BUNDLE = {
    "init_filters": 4,
    "blocks_down": [1, 1, 1],
    "inplane_spacing": 3.0,
    "roi_size": [48, 48],
    "patch_size": [32, 32, 4],
}


def job_main(name: str) -> Callable[[list[str]], int]:
    """``main`` of ``jobs/<name>/job.py``."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / name / "job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def recorded(result_dir: Path, round_num: int, site: str, direction: str) -> dict[str, np.ndarray]:
    with np.load(result_dir / "messages" / f"r{round_num}_{site}_{direction}.npz") as data:
        return {key: data[key] for key in data.files}


def test_fcl_job_exchanges_only_other_sites_features(site_splits, tiny_fcl_config, tmp_path):
    workspace, output = tmp_path / "ws", tmp_path / "out"
    code = job_main("fcl")(
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
        assert not any(kind_of(k) == "features" for k in recorded(result, 0, site, "down"))
        down = recorded(result, 1, site, "down")
        assert set(down["features/sites"].tolist()) == {site_tag(other)}
        sent_by_other = recorded(result, 0, other, "up")
        for name in ("embeddings", "partitions"):
            np.testing.assert_array_equal(down[f"features/{name}"], sent_by_other[f"features/{name}"])

        for round_num in (0, 1):
            up = recorded(result, round_num, site, "up")
            weights = {k[len("weights/") :]: v for k, v in up.items() if kind_of(k) == "weights"}
            assert weights.keys() == model.keys()
            assert all(weights[k].shape == tuple(model[k].shape) for k in model)
            features = {k: v for k, v in up.items() if kind_of(k) == "features"}
            assert features.keys() == {"features/embeddings", "features/partitions"}
            assert set(up) == set(features) | {f"weights/{k}" for k in model}
            embeddings, partitions = features["features/embeddings"], features["features/partitions"]
            assert embeddings.ndim == 2 and embeddings.shape[1] == 128 and embeddings.dtype == np.float32
            assert partitions.shape == embeddings.shape[:1] and partitions.dtype == np.int64
            # the privacy filter ran on the site's result before it left (FCL's keys are unit-norm)
            np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 0.5, rtol=1e-4)

    ledger = json.loads((output / "bytes.json").read_text())
    up_features = sum(v.nbytes for s in SITES for r in (0, 1) for k, v in recorded(result, r, s, "up").items()
                      if kind_of(k) == "features")  # fmt: skip
    assert ledger["totals"]["up"]["features"] == up_features
    assert {(r["round"], r["site"], r["direction"]) for r in ledger["records"]} == {
        (r, s, d) for r in (0, 1) for s in SITES for d in ("down", "up")
    }
    metrics = json.loads((output / "metrics.json").read_text())["records"]
    assert len(metrics) == 4 and all(m["metrics"]["loss_remote"] > 0 for m in metrics if m["round"] == 1)
    network = build_network(overrides=tiny_fcl_config["bundle"])
    assert load_pretrained_encoder(network, output / "pretrained_encoder.pt")


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


def test_finetune_job_beats_the_untrained_network(site_splits, tmp_path):
    workspace, output = tmp_path / "ws", tmp_path / "out"
    code = job_main("finetune")(
        ["--datalist-dir", str(site_splits), "--rounds", "3", "--local-epochs", "10", "--lr", "0.01",
         "--workspace", str(workspace), "--output", str(output),
         "--config", json.dumps({"bundle": TINY_BUNDLE})]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())["records"]
    assert [(m["round"], m["site"]) for m in metrics] == [(r, s) for r in range(3) for s in SITES]
    assert all(0.0 <= m["metrics"]["val_dice"] <= 1.0 for m in metrics)
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))

    untrained = tmp_path / "untrained.pt"
    initial = get_method("supervised").trainer.initial_message({"bundle": TINY_BUNDLE, "seed": 0})
    torch.save(message_to_state_dict(initial), untrained)
    before = mean_test_dice(untrained, site_splits, tmp_path / "eval-untrained")
    after = mean_test_dice(output / "global_model.pt", site_splits, tmp_path / "eval-global")
    assert after > before + 0.03, (before, after)
