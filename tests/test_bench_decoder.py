"""Decoder columns of the bench (``<base>+decoder``): the decoder stage on the base's encoders,
fine-tuning from its checkpoint, and the base's rows untouched. Units run in this process."""

import json
import shutil

import pytest
import torch
from conftest import inline_pool

from fedcontrast.bench.protocol import PROFILES, BenchConfig, FinetuneUnit, check_method, run_benchmark
from fedcontrast.bench.report import write_report


def final_rows(rows: list[dict], method: str) -> dict[tuple, float]:
    return {
        (r["unit"], r["site"], r["finetune_steps"], r["eval_split"]): r["dice_mean"]
        for r in rows
        if r["method"] == method
    }


def test_method_names_with_the_decoder_suffix_are_checked():
    check_method("fcl+decoder")
    check_method("random_init")
    with pytest.raises(ValueError, match="local_decoder is not one"):
        check_method("local_decoder+decoder")
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        check_method("nope+decoder")


@pytest.fixture
def decoder_loads(monkeypatch) -> list[tuple[str, bool, list[str]]]:
    """``(path, load_encoder, loaded keys)`` of every decoder checkpoint fine-tuning loads."""
    from fedcontrast.methods import supervised

    loads = []
    original = supervised.load_pretrained_decoder

    def spy(network, path, load_encoder=True, bundle_dir=None):
        keys = original(network, path, load_encoder, bundle_dir)
        loads.append((str(path), load_encoder, keys))
        return keys

    monkeypatch.setattr(supervised, "load_pretrained_decoder", spy)
    return loads


def test_decoder_column_runs_on_its_base_and_leaves_the_base_rows_bit_identical(
    tmp_path, monkeypatch, decoder_loads
):
    from fedcontrast.methods.supervised import SupervisedBundleTrainer
    from fedcontrast.nets.bundle import read_encoder
    from fedcontrast.nets.decoder import read_decoder_checkpoint

    submitted = inline_pool(monkeypatch)
    loads = decoder_loads
    quick = {**PROFILES["quick"], "readouts": ["finetune"]}

    alone = tmp_path / "alone"
    rows_alone = run_benchmark(BenchConfig(**quick, methods=["fcl"]), alone, workers=1)
    assert not loads

    both = tmp_path / "both"
    shutil.copytree(alone / "data", both / "data")  # the same phantom files, not generated again
    submitted.clear()
    rows = run_benchmark(BenchConfig(**quick, methods=["fcl", "fcl+decoder"]), both, workers=1)
    order = [f"{name} {getattr(unit, 'key', unit)}" for name, unit in submitted]
    stage = order.index("decoder_unit fcl+decoder")
    assert order.index("pretrain_unit fcl") < stage
    after = [i > stage for i, name in enumerate(order) if name.startswith("finetune_unit fcl+decoder|")]
    assert len(after) == 2 and all(after)

    # the base's rows are those of a run without the decoder column, bit for bit
    assert final_rows(rows, "fcl") == final_rows(rows_alone, "fcl") and final_rows(rows, "fcl")
    decoder_rows = [r for r in rows if r["method"] == "fcl+decoder"]
    assert {(r["finetune"], r["readout"]) for r in decoder_rows} == {
        ("local", "finetune"),
        ("federated", "finetune"),
    }
    fcl_bytes = {r["site"]: r["pretrain_bytes_up"] for r in rows if r["method"] == "fcl"}
    assert all(r["pretrain_bytes_up"] > fcl_bytes[r["site"]] > 0 for r in decoder_rows)  # base + stage

    # both fine-tuning units started from the decoder checkpoint: encoder and decoder blocks loaded
    folder = both / "pretrain" / "fcl+decoder_s0"
    checkpoint_file = folder / "pretrained_decoder.pt"
    # federated fine-tuning builds its start once, local fine-tuning once per site
    assert [(path, enc) for path, enc, _ in loads] == [(str(checkpoint_file), True)] * 3
    checkpoint = read_decoder_checkpoint(checkpoint_file)
    assert any(k.startswith("up_layers.") for k in loads[0][2]) and any(
        k.startswith("encoder.") for k in loads[0][2]
    )
    config = BenchConfig(**quick, methods=["fcl+decoder"])
    start = SupervisedBundleTrainer.initial_message(
        config.finetune_config(FinetuneUnit("fcl+decoder", 0, "federated", 1), "", str(checkpoint_file))
    )
    assert checkpoint["decoder"] and all(
        torch.equal(torch.as_tensor(start[f"weights/{k}"]), v) for k, v in checkpoint["decoder"].items()
    )
    encoder, _ = read_encoder(both / "pretrain" / "fcl_s0" / "global.pt")
    assert all(
        torch.equal(checkpoint["encoder"][k], v) for k, v in encoder.items()
    )  # the stage left it as is
    # the report shows the column like any method
    report = write_report(
        rows, BenchConfig(**quick, methods=["fcl", "fcl+decoder"]), both, both, 200
    ).read_text()
    assert "| fcl+decoder |" in report
    assert (both / "examples" / "fcl+decoder_federated.npz").exists()
    record = json.loads((folder / "record.json").read_text())
    assert {e["stage"] for e in record["curve"]} == {"encoder", "decoder"}
    assert record["wall_s"] > record["stage_wall_s"] > 0


def test_a_pretraining_that_writes_its_own_decoder_checkpoint_is_fine_tuned_from_it(
    tmp_path, monkeypatch, decoder_loads
):
    inline_pool(monkeypatch)
    quick = {**PROFILES["quick"], "readouts": ["finetune"], "methods": ["fedrestore"]}
    run_benchmark(BenchConfig(**quick), tmp_path / "encoder", workers=1)
    assert not decoder_loads  # by default fedrestore hands over its encoder only
    handover = BenchConfig(**quick, pretrain_overrides={"decoder_handover": True})
    rows = run_benchmark(handover, tmp_path / "network", workers=1)
    checkpoint_file = tmp_path / "network" / "pretrain" / "fedrestore_s0" / "pretrained_decoder.pt"
    assert [(path, enc) for path, enc, _ in decoder_loads] == [(str(checkpoint_file), True)] * 3
    keys = decoder_loads[0][2]
    assert any(k.startswith("up_layers.1.blocks.") for k in keys)  # every level, the full-resolution one too
    assert not any(".head." in k for k in keys) and any(k.startswith("encoder.") for k in keys)
    assert {(r["method"], r["finetune"]) for r in rows} == {
        ("fedrestore", "local"),
        ("fedrestore", "federated"),
    }
