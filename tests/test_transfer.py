"""Reduced-precision transfer of the networks: the codec, the NVFlare filter pair, the ledger, PTNU."""

import json

import numpy as np
import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedcontrast.flare.jobs import build_job, export_job
from fedcontrast.flare.ledger import RunLedger
from fedcontrast.flare.messages import message_to_flmodel
from fedcontrast.flare.quantize import NetworkDequantizer, NetworkQuantizer
from fedcontrast.methods.base import count_bytes, select
from fedcontrast.methods.fclopt import FCLOptPTNUDPStrategy, FCLOptTrainer
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.transfer import BLOCK, decode, encode, round_trip, transfer_precision


def network_message(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights and target of mixed scales, a BatchNorm counter, features and a stat."""
    rng = np.random.default_rng(seed)
    return {
        "weights/encoder.conv.weight": rng.normal(0, 0.05, size=(8, 4, 3, 3, 3)).astype(np.float32),
        "weights/encoder.bn.bias": rng.normal(0, 2.0, size=(8,)).astype(np.float32),
        "weights/encoder.bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "target/head.fc.weight": rng.normal(0, 0.1, size=(16, 300)).astype(np.float32),
        "features/embeddings": rng.normal(size=(6, 16)).astype(np.float32),
        "features/partitions": np.arange(6, dtype=np.int64),
        "stats/steps": np.array(3, dtype=np.int64),
    }


def test_float16_round_trip_keeps_each_value_within_half_precision_and_halves_the_networks():
    message = network_message()
    sent = encode(message, "float16")
    received = decode(sent)
    assert received.keys() == message.keys()
    for key, value in message.items():
        assert received[key].shape == value.shape and received[key].dtype == value.dtype
        if key.startswith(("features/", "stats/")) or value.dtype == np.int64:
            assert np.array_equal(received[key], value), key  # untouched
        else:
            assert sent[key].dtype == np.float16
            # half precision: relative error <= 2**-11 for normal values, absolute <= 2**-25 below
            np.testing.assert_allclose(received[key], value, rtol=2.0**-11, atol=2.0**-25)
    full, half = count_bytes(message), count_bytes(sent)
    assert half["features"] == full["features"] and half["stats"] == full["stats"]
    assert half["target"] == full["target"] // 2
    assert half["weights"] == (full["weights"] - 8) // 2 + 8  # the int64 counter keeps its 8 bytes
    assert all(np.array_equal(round_trip(received, "float16")[k], received[k]) for k in received)


def test_blockwise8_round_trip_keeps_each_value_within_a_step_of_its_block_scale():
    message = network_message(1)
    sent = encode(message, "blockwise8")
    received = decode(sent)
    assert received.keys() == message.keys()
    for key in ("weights/encoder.conv.weight", "weights/encoder.bn.bias", "target/head.fc.weight"):
        value = message[key]
        assert sent[key].dtype == np.int8 and sent[key].size % BLOCK == 0
        flat = np.zeros(sent[key].size, dtype=np.float32)
        flat[: value.size] = value.ravel()
        absmax = np.abs(flat.reshape(-1, BLOCK)).max(axis=1)
        np.testing.assert_array_equal(sent[key + "#absmax"], absmax)
        bound = np.repeat(absmax / 254 * (1 + 1e-5), BLOCK)[: value.size].reshape(value.shape)
        assert np.all(np.abs(received[key] - value) <= bound), key
    assert np.array_equal(received["features/embeddings"], message["features/embeddings"])
    assert received["weights/encoder.bn.num_batches_tracked"] == 7
    # 8 x 4 x 27 = 864 floats -> 4 blocks of int8 + 4 scales + the shape (5 dims)
    assert count_bytes(sent)["target"] == 19 * BLOCK + 19 * 4 + 2 * 8
    assert count_bytes(sent)["weights"] == (4 + 1) * BLOCK + 5 * 4 + (5 + 1) * 8 + 8


def test_float32_and_bad_settings():
    message = network_message()
    assert encode(message, "float32") == message and round_trip(message, "float32") == message
    assert transfer_precision({}) == "float32"
    with pytest.raises(ValueError, match="transfer must be one of"):
        transfer_precision({"transfer": "int4"})
    with pytest.raises(ValueError, match="transfer must be one of"):
        RunLedger("unused", tensorboard=False, transfer="bf8")
    broken = encode(message, "blockwise8")
    del broken["target/head.fc.weight#absmax"]
    with pytest.raises(ValueError, match="#absmax"):
        decode(broken)


@pytest.mark.parametrize("precision", ["float16", "blockwise8"])
def test_filter_pair_delivers_the_round_trip_and_the_ledger_counts_the_wire_bytes(precision, tmp_path):
    message = network_message(2)
    task = FLModelUtils.to_shareable(message_to_flmodel(message, round_num=0, total_rounds=1))
    on_wire = NetworkQuantizer(precision).process(task, FLContext())
    wire = FLModelUtils.from_shareable(on_wire).params
    assert count_bytes(wire) == count_bytes(encode(message, precision))
    arrived = FLModelUtils.from_shareable(NetworkDequantizer().process(on_wire, FLContext())).params
    expected = round_trip(message, precision)
    assert arrived.keys() == expected.keys()
    assert all(np.array_equal(arrived[k], expected[k]) for k in expected)  # bit for bit
    ledger = RunLedger(tmp_path, tensorboard=False, transfer=precision)
    counted = ledger.record_message(0, "site-1", "down", message)
    assert counted == count_bytes(wire)
    assert counted["weights"] + counted["target"] < 0.55 * sum(
        count_bytes(message)[k] for k in ("weights", "target")
    )
    ledger.end_round(0)
    assert json.loads((tmp_path / "bytes.json").read_text())["transfer"] == precision


def test_a_float16_job_carries_the_filter_pair_on_both_sides(tmp_path):
    job = build_job("fcl", {"transfer": "float16"}, num_rounds=1, num_sites=2, name="fp16")
    folder = export_job(job, tmp_path)
    client = json.loads((folder / "app/config/config_fed_client.json").read_text())
    server = json.loads((folder / "app/config/config_fed_server.json").read_text())

    def paths(section: list[dict]) -> list[str]:
        return [f["path"].rsplit(".", 1)[-1] for entry in section for f in entry["filters"]]

    assert paths(server["task_data_filters"]) == ["NetworkQuantizer"]
    assert paths(client["task_data_filters"]) == ["NetworkDequantizer"]
    # the outbound policy checks the method's message first, then it is encoded for the wire
    assert paths(client["task_result_filters"]) == ["OutboundPolicyFilter", "NetworkQuantizer"]
    assert paths(server["task_result_filters"]) == ["NetworkDequantizer"]
    assert server["task_data_filters"][0]["filters"][0]["args"]["precision"] == "float16"


def test_ptnu_dp_with_float16_counts_half_the_network_bytes_and_tracks_the_sites_exactly(
    phantom_images, tiny_fclopt_config, monkeypatch
):
    config = {
        **tiny_fclopt_config,
        "exchange": "prototypes",
        "delta": 0.0,  # every round corrects: the corrections travel in float16 too
        "sync_every": 100,
        "seed": 3,
    }
    held, server = {}, {}
    begin, aggregate = FCLOptTrainer.begin_round, FCLOptPTNUDPStrategy.aggregate

    def spy_begin(self, incoming):
        begin(self, incoming)
        held[self.round_num, self.site] = {k: v.copy() for k, v in self.held_target.items()}

    def spy_aggregate(self, updates, round_num):
        aggregate(self, updates, round_num)
        server[round_num] = {k: v.copy() for k, v in self.site_target.items()}

    monkeypatch.setattr(FCLOptTrainer, "begin_round", spy_begin)
    monkeypatch.setattr(FCLOptPTNUDPStrategy, "aggregate", spy_aggregate)
    datalists = phantom_images(1)
    result = run_in_process("fclopt_ptnu_dp", {**config, "transfer": "float16"}, datalists, rounds=2)
    for site in datalists:
        # the correction of round 0 arrives as float16 and the server tracks exactly that
        assert all(np.array_equal(held[1, site][k], server[0][k]) for k in server[0])
        assert all(v.dtype == np.float32 for v in held[1, site].values() if v.dtype.kind == "f")
    full = run_in_process("fclopt_ptnu_dp", config, datalists, rounds=1).history
    half = [r for r in result.history if r["round"] == 0]
    for a, b in zip(full, half):
        for direction in ("bytes_down", "bytes_up"):
            weights = select(result.global_message, "weights")
            counters = 8 * len([k for k in weights if k.endswith("num_batches_tracked")])
            assert b[direction]["weights"] == (a[direction]["weights"] - counters) // 2 + counters
            assert b[direction]["features"] == a[direction]["features"]
