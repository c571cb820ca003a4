"""The replicate comparison: it matches rows and paired-difference cells of two runs of one
configuration, measures how far they moved, and refuses runs with other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import replicate  # benchmarks/ is on the path (conftest)


def row(method: str, seed: int, dice: float, steps: int = 96, split: str = "test") -> dict:
    return {
        "method": method,
        "finetune": "local",
        "readout": "finetune",
        "n_labeled": 1,
        "seed": seed,
        "site": "site-1",
        "dice_mean": dice,
        "finetune_steps": steps,
        "eval_split": split,
    }


def cell(method: str, n: int, mean: float, low: float, high: float, pairs: int = 8) -> dict:
    return {
        "finetune": "local",
        "readout": "finetune",
        "method": method,
        "n_labeled": n,
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "n_pairs": pairs,
    }


def results(folder: Path, rows: list[dict], cells: list[dict], **config) -> Path:
    document = {
        "config": {"methods": ["random_init", "fcl"], "finetune_lr": 3e-3} | config,
        "environment": {"cpu": folder.name},
        "summary": {"final_steps": {"local/finetune": 96}, "paired_differences": cells},
        "rows": rows,
    }
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(document))
    return folder


def test_rows_and_cells_of_two_runs_are_compared_on_what_both_hold(tmp_path):
    a = results(
        tmp_path / "amd",
        # the 48-step and validation rows are not final-checkpoint test rows: ignored
        [
            row("fcl", 0, 0.50),
            row("fcl", 1, 0.40),
            row("fcl", 0, 0.1, steps=48),
            row("fcl", 0, 0.9, split="validation"),
        ],
        [
            cell("fcl", 1, 0.03, 0.01, 0.05),
            cell("fcl", 2, -0.01, -0.03, 0.01),
            cell("fcl", 4, 0.0, -0.1, 0.1),
        ],
    )
    b = results(
        tmp_path / "xeon",
        [row("fcl", 0, 0.50), row("fcl", 1, 0.46), row("fcl", 2, 0.3), row("fcl", 0, 0.7, steps=48)],
        # N=4 holds fewer pairs here (an unfinished cell): not compared
        [
            cell("fcl", 1, 0.01, -0.01, 0.03),
            cell("fcl", 2, -0.02, -0.04, 0.00),
            cell("fcl", 4, 0.0, -0.1, 0.1, pairs=4),
        ],
        methods=["random_init", "fcl", "fedmoco"],  # a later column: allowed
    )
    out = tmp_path / "out" / "replicate"
    replicate.main([str(a), str(b), "--names", "AMD", "Xeon", "--out", str(out)])
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["rows"] == {
        "common": 2,
        "identical": 1,
        "mean_abs_dice_difference": pytest.approx(0.03),
        "max_abs_dice_difference": pytest.approx(0.06),
    }
    assert [(c["n_labeled"], round(c["moved"], 6)) for c in document["cells"]] == [(1, -0.02), (2, -0.01)]
    assert document["cells_summary"]["mean_abs_moved"] == pytest.approx(0.015)
    assert document["cells_summary"]["verdict_changed"] == 1  # N=1: above 0 -> across 0
    assert document["environments"] == [{"cpu": "amd"}, {"cpu": "xeon"}]
    text = out.with_suffix(".md").read_text()
    assert (
        "| local | finetune | fcl | 1 | +0.030 [0.010, 0.050] | +0.010 [-0.010, 0.030] "
        "| -0.020 (verdict changed) |" in text
    )
    assert "--names AMD Xeon" in text


def test_runs_of_other_settings_are_refused(tmp_path):
    a = results(tmp_path / "a", [row("fcl", 0, 0.5)], [cell("fcl", 1, 0.0, -0.1, 0.1)])
    b = results(tmp_path / "b", [row("fcl", 0, 0.5)], [cell("fcl", 1, 0.0, -0.1, 0.1)], finetune_lr=1e-3)
    with pytest.raises(ValueError, match="differ in finetune_lr"):
        replicate.main([str(a), str(b), "--out", str(tmp_path / "out")])
