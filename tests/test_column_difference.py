"""Pairing a column of one run with a column of another: only where random init's rows are
identical (the fine-tuning is the same), on the (seed, site) pairs both hold."""

from __future__ import annotations

import json
from pathlib import Path

import column_difference
import pytest


def row(method: str, seed: int, site: str, dice: float, steps: int = 96) -> dict:
    return {
        "method": method,
        "finetune": "federated",
        "readout": "probe",
        "n_labeled": 1,
        "seed": seed,
        "site": site,
        "dice_mean": dice,
        "finetune_steps": steps,
        "eval_split": "test",
    }


def run(folder: Path, method: str, scores: dict, random_init: float = 0.4, **config) -> Path:
    rows = [row("random_init", s, site, random_init + s / 100) for s, site in scores]
    rows += [row(method, s, site, dice) for (s, site), dice in scores.items()]
    rows += [row(method, s, site, 0.0, steps=48) for s, site in scores]  # an earlier checkpoint
    document = {"config": {"methods": ["random_init", method], "finetune_lr": 3e-3} | config, "rows": rows}
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(document))
    return folder


def test_a_column_of_one_run_minus_a_column_of_another(tmp_path, capsys):
    a = run(tmp_path / "a", "fcl", {(0, "site-1"): 0.50, (0, "site-2"): 0.60, (1, "site-1"): 0.70})
    b = run(tmp_path / "b", "ceiling", {(0, "site-1"): 0.55, (0, "site-2"): 0.70, (1, "site-1"): 0.70})
    out = tmp_path / "diff"
    assert column_difference.main([str(a), "fcl", str(b), "ceiling", "--out", str(out)]) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["identical_random_init_rows"] == 3
    (cell,) = document["cells"]
    assert (cell["finetune"], cell["readout"], cell["n_labeled"]) == ("federated", "probe", 1)
    assert cell["mean"] == pytest.approx((-0.05 - 0.10 + 0.0) / 3) and cell["n_pairs"] == 3
    assert "| federated | probe | 1 | -0.050 [" in out.with_suffix(".md").read_text()


def test_runs_whose_random_init_or_fine_tuning_differ_are_refused(tmp_path):
    a = run(tmp_path / "a", "fcl", {(0, "site-1"): 0.5})
    b = run(tmp_path / "b", "ceiling", {(0, "site-1"): 0.6}, random_init=0.41)
    with pytest.raises(ValueError, match="random init's rows differ in 1 of 1"):
        column_difference.main([str(a), "fcl", str(b), "ceiling", "--out", str(tmp_path / "d")])
    c = run(tmp_path / "c", "ceiling", {(0, "site-1"): 0.6}, finetune_lr=1e-3)
    with pytest.raises(ValueError, match="finetune_lr"):
        column_difference.main([str(a), "fcl", str(c), "ceiling", "--out", str(tmp_path / "d")])


def test_validation_pairs_come_from_the_run_folders_rows(tmp_path):
    """``--split validation`` reads each folder's ``rows.jsonl`` (``results.json`` keeps only random
    init's validation rows) and pairs the validation rows; the test rows do not enter."""
    folders = {}
    for name, method, gain in (("a", "fcl", 0.10), ("b", "ceiling", 0.04)):
        rows = []
        for split, split_gain in (("validation", gain), ("test", -1.0)):
            for seed in (0, 1):
                base = {**row("random_init", seed, "site-1", 0.4 + seed / 100), "eval_split": split}
                rows += [base, {**base, "method": method, "dice_mean": 0.4 + seed / 100 + split_gain}]
        folder = folders[name] = tmp_path / name
        folder.mkdir()
        (folder / "bench_config.json").write_text(json.dumps({"methods": ["random_init", method]}))
        (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "diff"
    args = [
        str(folders["a"]),
        "fcl",
        str(folders["b"]),
        "ceiling",
        "--split",
        "validation",
        "--out",
        str(out),
    ]
    assert column_difference.main(args) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["split"] == "validation" and document["identical_random_init_rows"] == 2
    assert document["cells"][0]["mean"] == pytest.approx(0.06)
    with pytest.raises(FileNotFoundError, match=r"no bench_config\.json"):
        column_difference.main(
            [str(tmp_path), "fcl", str(folders["b"]), "ceiling", "--split", "validation", "--out", str(out)]
        )


def test_pairs_of_another_data_seed_are_pooled_as_their_own_units(tmp_path):
    """``--also`` adds the columns on another phantom: seed 0 of data seed 0 and seed 0 of data seed 1
    are two units; pairs that share a data seed, and a column missing from its run, are refused."""
    first = {(0, "site-1"): 0.50, (1, "site-1"): 0.60}
    a0 = run(tmp_path / "a0", "fcl", first, data_seed=0)
    b0 = run(tmp_path / "b0", "ceiling", {k: v + 0.10 for k, v in first.items()}, data_seed=0)
    a1 = run(tmp_path / "a1", "fcl", first, data_seed=1)
    b1 = run(tmp_path / "b1", "ceiling", {k: v - 0.02 for k, v in first.items()}, data_seed=1)
    out = tmp_path / "pooled"
    args = [
        str(a0),
        "fcl",
        str(b0),
        "ceiling",
        "--also",
        str(a1),
        "fcl",
        str(b1),
        "ceiling",
        "--out",
        str(out),
    ]
    assert column_difference.main(args) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    (cell,) = document["cells"]
    assert cell["n_pairs"] == 4 and cell["n_seeds"] == 4
    assert cell["mean"] == pytest.approx((-0.10 * 2 + 0.02 * 2) / 4)
    assert document["data_seeds"] == [0, 1] and document["identical_random_init_rows"] == 4
    assert "pooled over data seeds [0, 1]" in out.with_suffix(".md").read_text()
    again = [
        str(a0),
        "fcl",
        str(b0),
        "ceiling",
        "--also",
        str(a0),
        "fcl",
        str(b0),
        "ceiling",
        "--out",
        str(out),
    ]
    with pytest.raises(ValueError, match="share a data seed"):
        column_difference.main(again)
    misnamed = [*args[:5], str(a1), "fcl", str(b1), "supervised", "--out", str(out)]
    with pytest.raises(ValueError, match="data seed 1: no test rows of supervised in its run B"):
        column_difference.main(misnamed)


def test_gains_pair_each_column_minus_its_own_random_init(tmp_path):
    """``--gains``: runs whose random init differs (another phantom difficulty) compare what each
    column gains over its own random init: (0.50 - 0.40) - (0.55 - 0.50) on seed 0's pair."""
    a = run(tmp_path / "a", "fcl", {(0, "site-1"): 0.50, (1, "site-1"): 0.60}, difficulty="anatomy")
    b = run(tmp_path / "b", "fcl", {(0, "site-1"): 0.55, (1, "site-1"): 0.50}, random_init=0.50)
    out = tmp_path / "gains"
    common = [str(a), "fcl", str(b), "fcl", "--out", str(out)]
    with pytest.raises(ValueError, match="difficulty"):
        column_difference.main([*common, "--gains"])
    with pytest.raises(ValueError, match="random init's rows differ"):
        column_difference.main([*common, "--free", "difficulty", "methods"])
    assert column_difference.main([*common, "--gains", "--free", "difficulty", "methods"]) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    (cell,) = document["cells"]
    assert document["gains"] and cell["n_pairs"] == 2
    assert cell["mean"] == pytest.approx(((0.10 - 0.05) + (0.19 - -0.01)) / 2)
    assert "fcl gain over random init" in out.with_suffix(".md").read_text()


def test_columns_fine_tuned_differently_pair_without_comparing_random_init(tmp_path):
    scaled = run(
        tmp_path / "scaled", "fcl", {(0, "site-1"): 0.5, (1, "site-1"): 0.6}, finetune_encoder_lr_scale=0.1
    )
    baseline = run(tmp_path / "baseline", "ceiling", {(0, "site-1"): 0.6}, random_init=0.3)
    out, free = tmp_path / "d", ["--free", "methods", "finetune_encoder_lr_scale"]
    assert (
        column_difference.main([str(scaled), "fcl", str(baseline), "random_init", "--out", str(out), *free])
        == 0
    )
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["fine_tuning_differs_in"] == ["finetune_encoder_lr_scale"]
    assert document["identical_random_init_rows"] == 0
    assert [(c["mean"], c["n_pairs"]) for c in document["cells"]] == [(pytest.approx(0.5 - 0.3), 1)]
    assert "fine-tune differently (finetune_encoder_lr_scale)" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="finetune_encoder_lr_scale"):  # only where it is freed
        column_difference.main([str(scaled), "fcl", str(baseline), "random_init", "--out", str(out)])
