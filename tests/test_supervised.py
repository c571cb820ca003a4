"""The ``supervised`` method: two tiny sites fine-tune the bundle network in process, federated and alone."""

import json
import math

import pytest
import torch
from conftest import job_module

from fedcontrast.cli import main as fedcontrast_cli
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.supervised import SupervisedBundleTrainer, supervised_entries
from fedcontrast.nets.bundle import build_network, encoder_options, save_encoder
from fedcontrast.nets.presets import network_preset

SITES = ("site-1", "site-2")
#: A tiny network on the small phantom (about 3.3 mm pixels, 7-9 slices).
TINY = network_preset("tiny_phantom")
CONFIG = {"bundle": TINY, "local_epochs": 1, "batch_size": 2, "lr": 3e-3, "seed": 1}


@pytest.fixture(scope="module")
def datalists(tmp_path_factory) -> dict[str, list[dict]]:
    """Two sites of 3 patients: 4 labelled training volumes and 1 test patient (2 volumes) each."""
    root = tmp_path_factory.mktemp("supervised")
    fedcontrast_cli(
        ["data", "synth", "--out", str(root / "data"), "--sites", "2", "--patients-per-site", "3"]
    )
    fedcontrast_cli(
        ["data", "split", "--dataset", str(root / "data"), "--format", "acdc", "--out", str(root / "splits"),
         "--labeled-per-site", "4", "--test-per-site", "1"]
    )  # fmt: skip
    return {site: supervised_entries(load_site_datalist(root / "splits" / f"{site}.json")) for site in SITES}


def test_registered_as_fine_tuning():
    spec = get_method("supervised")
    assert spec.trainer is SupervisedBundleTrainer
    assert not spec.pretraining and spec.federated


def test_supervised_entries_tags_the_test_part():
    site = {"training": [{"image": "a", "label": "b"}], "test": [{"image": "c", "label": "d"}]}
    entries = supervised_entries(site)
    assert [e.get("split") for e in entries] == [None, "validation"]


def test_initial_message_is_the_seeded_bundle_network():
    first = message_to_state_dict(SupervisedBundleTrainer.initial_message(CONFIG))
    again = message_to_state_dict(SupervisedBundleTrainer.initial_message(CONFIG))
    assert first.keys() == build_network(overrides=TINY).state_dict().keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_initial_message_loads_the_pretrained_encoder(tmp_path):
    encoder = build_network(overrides=TINY).encoder.state_dict()
    encoder = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in encoder.items()}
    save_encoder(encoder, tmp_path / "encoder.pt", encoder_options(overrides=TINY))
    weights = message_to_state_dict(
        SupervisedBundleTrainer.initial_message(
            {**CONFIG, "pretrained_encoder": str(tmp_path / "encoder.pt")}
        )
    )
    assert all(torch.equal(weights[f"encoder.{k}"], v) for k, v in encoder.items())
    # fine-tuning on another voxel grid than pre-training is refused, naming the option
    with pytest.raises(ValueError, match=r"roi_size: pre-trained \[48, 48\], this network \[64, 64\]"):
        SupervisedBundleTrainer.initial_message(
            {
                **CONFIG,
                "bundle": {**TINY, "roi_size": [64, 64]},
                "pretrained_encoder": str(tmp_path / "encoder.pt"),
            }
        )


def test_unlabelled_entries_are_refused():
    with pytest.raises(ValueError, match="no 'label' for"):
        SupervisedBundleTrainer(CONFIG, [{"image": "x.nii.gz"}], "site-1")


def test_federated_rounds_train_through_the_bundle(datalists):
    result = run_in_process("supervised", CONFIG, datalists, rounds=2, federated=True)
    assert len(result.history) == 4
    for record in result.history:
        metrics = record["metrics"]
        assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 2
        assert 0.0 <= metrics["val_dice"] <= 1.0
        assert {"val_dice_RV", "val_dice_MYO", "val_dice_LV"} <= metrics.keys()
        assert record["bytes_up"]["weights"] > 0
    initial = message_to_state_dict(get_method("supervised").trainer.initial_message(CONFIG))
    final = message_to_state_dict(result.global_message)
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    # the global weights load straight into the bundle network (what the server saves)
    build_network(overrides=TINY).load_state_dict(final)


def test_local_training_keeps_sites_apart(datalists):
    result = run_in_process("supervised", CONFIG, datalists, rounds=1, federated=False)
    one, two = (message_to_state_dict(result.final_messages[s]) for s in SITES)
    assert any(not torch.equal(one[k], two[k]) for k in one)
    assert result.encoders["site-1"].keys() == build_network(overrides=TINY).encoder.state_dict().keys()


def test_finetune_job_exports_the_encoder_learning_rate_settings_beside_other_bundle_overrides(tmp_path):
    job = job_module("finetune")
    argv = [
        "--export",
        str(tmp_path),
        "--encoder-lr-scale",
        "0.3",
        "--encoder-warmup-steps",
        "48",
        "--config",
        '{"bundle": {"init_filters": 4}}',
    ]
    assert job.main(argv) == 0
    server = json.loads((tmp_path / "finetune/app/config/config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["config"]["bundle"] == {
        "encoder_lr_scale": 0.3,
        "encoder_warmup_iterations": 48,
        "init_filters": 4,
    }
