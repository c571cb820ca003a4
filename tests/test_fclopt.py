"""BYOL losses, FCLOpt's prototypes, and federated BYOL / FCLOpt in process on a tiny phantom."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import job_module

from fedcontrast.methods.base import SiteUpdate, count_bytes, select, weighted_average
from fedcontrast.methods.byol import DEFAULTS as BYOL_DEFAULTS
from fedcontrast.methods.byol import byol_loss, negative_cosine, structural_matching_loss
from fedcontrast.methods.fclopt import VARIANTS, FCLOptStrategy, FCLOptTrainer, partition_prototypes
from fedcontrast.methods.partitions import site_tag
from fedcontrast.methods.registry import available_methods, get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.target_sync import TargetSync
from fedcontrast.nets.heads import PredictionHead
from fedcontrast.nets.presets import network_preset

SITES = ("site-1", "site-2")
S, DIM = 4, 16
CONFIG = {
    "bundle": network_preset("tiny", roi_size=[32, 32]),
    "batch_size": 2,
    "head_hidden": 16,
    "predictor_hidden": 16,
    "embedding_dim": DIM,
    "partitions": S,
    "features_per_partition": 2,
    "remote_samples": 2,
    "seed": 7,
}


@pytest.fixture(scope="module")
def datalists(phantom_images) -> dict[str, list[dict]]:
    return phantom_images(1)


def test_negative_cosine_and_byol_loss_by_hand():
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert negative_cosine(x, 5 * x).item() == pytest.approx(0.0)  # aligned, any norm
    assert negative_cosine(x, y).item() == pytest.approx(2.0)  # orthogonal
    assert negative_cosine(x, -x).item() == pytest.approx(4.0)  # opposite
    diagonal = torch.tensor([[1.0, 1.0]])
    # (2 - 2 cos(x, y) + 2 - 2 cos(diagonal, x)) / 2 = (2 + 2 - sqrt(2)) / 2
    assert byol_loss(x, diagonal, x, y).item() == pytest.approx((4 - math.sqrt(2)) / 2)


def test_structural_matching_averages_over_same_partition_remote_features():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    partitions = torch.tensor([0, 1])
    remote = torch.tensor([[1.0, 0.0], [0.0, -2.0], [0.0, 1.0]])
    remote_partitions = torch.tensor([0, 0, 2])
    # only query 0 has remote features of its partition: (0 + 2) / 2
    loss = structural_matching_loss(p, partitions, remote, remote_partitions)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert p.grad is not None
    empty = structural_matching_loss(p, partitions, torch.empty(0, 2), torch.empty(0, dtype=torch.int64))
    assert empty.item() == 0.0 and empty.requires_grad


def test_partition_prototypes_are_per_partition_means():
    embeddings = np.array([[1, 0], [3, 0], [0, 2], [0, 4]], dtype=np.float32)
    prototypes = partition_prototypes(embeddings, np.array([2, 2, 0, 0]))
    np.testing.assert_array_equal(prototypes["embeddings"], [[0, 3], [2, 0]])
    assert prototypes["partitions"].tolist() == [0, 2] and prototypes["partitions"].dtype == np.int64


def test_prediction_head_keeps_the_embedding_width():
    assert PredictionHead(DIM, 8)(torch.randn(3, DIM)).shape == (3, DIM)


def test_registered_variants():
    assert {"fedbyol", *VARIANTS} <= set(available_methods(pretraining=True))
    assert get_method("fedbyol").strategy is TargetSync
    assert get_method("fedbyol").trainer.DEFAULTS is BYOL_DEFAULTS
    assert BYOL_DEFAULTS["target_update"] == "average"
    for name, mode in VARIANTS.items():
        spec = get_method(name)
        assert issubclass(spec.trainer, FCLOptTrainer) and issubclass(spec.strategy, FCLOptStrategy)
        assert spec.trainer.DEFAULTS["target_update"] == spec.strategy.DEFAULTS["target_update"] == mode


def test_fedbyol_sends_online_and_target_networks_both_ways(datalists):
    result = run_in_process("fedbyol", CONFIG, datalists, rounds=1)
    initial = get_method("fedbyol").trainer.initial_message(CONFIG)
    weights, target = select(initial, "weights"), select(initial, "target")
    assert {k.split(".", 1)[0] for k in weights} == {"encoder", "head", "predictor"}
    assert set(target) == {k for k in weights if not k.startswith("predictor.")}
    target_bytes = count_bytes({f"target/{k}": v for k, v in target.items()})["target"]
    for record in result.history:
        for direction in ("bytes_down", "bytes_up"):
            assert record[direction]["target"] == target_bytes > 0
            assert record[direction]["weights"] > target_bytes
            assert record[direction]["features"] == record[direction]["stats"] == 0
        assert math.isfinite(record["metrics"]["loss"]) and 0 <= record["metrics"]["loss"] <= 4
    # the server's target is the average of the sites' targets (equal sample counts)
    uploads = {s: SiteUpdate(m, 1) for s, m in result.final_messages.items()}
    expected = weighted_average(uploads, "target")
    assert all(np.allclose(result.global_message[k], v) for k, v in expected.items())
    assert not np.allclose(expected["target/head.mlp.0.weight"], initial["target/head.mlp.0.weight"])


def test_fclopt_exchanges_prototypes_of_the_target_network(datalists, monkeypatch):
    received: dict[tuple[int, str], list[int]] = {}
    original = FCLOptTrainer.local_round

    def spy(self, incoming, round_num):
        received[round_num, self.site] = sorted(set(incoming.get("features/sites", np.array([])).tolist()))
        return original(self, incoming, round_num)

    monkeypatch.setattr(FCLOptTrainer, "local_round", spy)
    result = run_in_process("fclopt", {**CONFIG, "exchange": "prototypes"}, datalists, rounds=2)
    assert received == {
        (0, "site-1"): [],
        (0, "site-2"): [],
        (1, "site-1"): [site_tag("site-2")],
        (1, "site-2"): [site_tag("site-1")],
    }
    for record in result.history:
        # S prototypes of DIM float32 plus their S int64 partition ids; targets both ways
        assert record["bytes_up"]["features"] == S * DIM * 4 + S * 8
        assert record["bytes_up"]["target"] == record["bytes_down"]["target"] > 0
        assert (record["metrics"]["loss_global"] > 0) == (record["round"] == 1)
    for message in result.final_messages.values():
        features = select(message, "features")
        assert features["embeddings"].shape == (S, DIM) and features["embeddings"].dtype == np.float32
        assert features["partitions"].tolist() == list(range(S))


def test_job_exports_the_variant_with_its_options(tmp_path, capsys):
    job = job_module("fclopt")
    argv = ["--export", str(tmp_path), "--variant", "fclopt_ptnu_dp", "--delta", "0.02", "--sync-every", "3"]
    assert job.main([*argv, "--exchange", "prototypes", "--task-timeout", "900"]) == 0
    server = json.loads((tmp_path / "fclopt_ptnu_dp/app/config/config_fed_server.json").read_text())
    args = server["workflows"][0]["args"]
    assert args["method"] == "fclopt_ptnu_dp" and args["task_name"] == "pretrain"
    assert args["task_timeout"] == 900
    assert {k: args["config"][k] for k in ("delta", "sync_every", "exchange")} == {
        "delta": 0.02,
        "sync_every": 3,
        "exchange": "prototypes",
    }
    with pytest.raises(SystemExit):
        job.main(["--export", str(tmp_path), "--variant", "fclopt_ptnu", "--local"])
    assert "--local trains each site alone" in capsys.readouterr().err
