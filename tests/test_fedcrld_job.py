"""``jobs/fedcrld`` end to end in the NVFlare simulator, 2 tiny sites: on the messages the server
actually sent and received, nothing but the shared encoder travels, and no private-encoder,
attention or decoder weight leaves a site; each site keeps its own model."""

import json

import numpy as np
import pytest
import torch
from conftest import job_module, recorded_message

from fedcontrast.methods.fedcrld import SITE_MODEL_FILE, network_overrides
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.presets import network_preset

pytestmark = pytest.mark.simulator

SITES = ("site-1", "site-2")
ROUNDS = (0, 1)
TINY = network_preset("tiny_phantom", samples_per_volume=2)


def test_fedcrld_job_sends_only_the_shared_encoder(site_splits, tmp_path):
    workspace, output = tmp_path / "ws", tmp_path / "out"
    config = {"bundle": TINY, "batch_size": 1}
    code = job_module("fedcrld").main(
        ["--datalist-dir", str(site_splits), "--rounds", "2", "--workspace", str(workspace),
         "--output", str(output), "--record-messages", "--config", json.dumps(config)]
    )  # fmt: skip
    assert code == 0
    result = workspace / "server" / "simulate_job"
    network = build_network(overrides=network_overrides(config)).state_dict()
    shared = {f"weights/{k}": tuple(v.shape) for k, v in network.items() if k.startswith("encoder.")}
    local_only = {k: v for k, v in network.items() if not k.startswith("encoder.")}
    assert any(k.startswith("private_encoder.") for k in local_only)
    assert any(k.startswith("up_layers.") for k in local_only) and any(
        k.startswith("crl.") for k in local_only
    )

    models = {
        site: torch.load(output / "sites" / site / SITE_MODEL_FILE, weights_only=True) for site in SITES
    }
    for site in SITES:
        model = models[site]
        assert model.keys() == network.keys()
        for round_num in ROUNDS:
            for direction in ("down", "up"):
                message = recorded_message(result, round_num, site, direction)
                assert {k: v.shape for k, v in message.items()} == shared, (round_num, site, direction)
        # by value: the last upload is the site's final shared encoder, and none of its arrays is
        # any private, attention or decoder tensor of the site's model
        last = recorded_message(result, ROUNDS[-1], site, "up")
        for key, value in last.items():
            np.testing.assert_array_equal(value, model[key[len("weights/") :]].numpy())
        sent = [v for v in last.values() if v.size > 1]
        for name in local_only:
            mine = model[name].numpy()
            assert not any(v.shape == mine.shape and np.array_equal(v, mine) for v in sent), name

    # the sites trained their private parts apart; the byte ledger counts only the shared encoder
    one, two = models.values()
    assert any(not torch.equal(one[k], two[k]) for k in local_only if k.startswith("private_encoder."))
    ledger = json.loads((output / "bytes.json").read_text())
    shared_bytes = sum(network[k[len("weights/") :]].numpy().nbytes for k in shared)
    for direction in ("down", "up"):
        assert ledger["totals"][direction]["weights"] == shared_bytes * len(SITES) * len(ROUNDS)
        assert ledger["totals"][direction]["total"] == ledger["totals"][direction]["weights"]
    records = json.loads((output / "metrics.json").read_text())["records"]
    metrics = [m for m in records if m["site"] != "server"]  # the server's records hold its round timing
    assert all(m["metrics"]["loss_distill"] >= 0 for m in metrics if m["round"] == 1)
    assert not (output / "global_model.pt").exists()
