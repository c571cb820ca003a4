"""Choosing a fine-tuning recipe per mode on validation differences only; test reported beside it."""

from __future__ import annotations

import json
from pathlib import Path

import choose_recipe
import pytest


def outputs(prefix: Path, validation: dict[str, float], test: dict[str, float]) -> str:
    """column_difference.py outputs (validation and test) with full fine-tuning cells per mode."""
    for suffix, means in (("_validation.json", validation), (".json", test)):
        cells = [
            {"finetune": mode, "readout": "finetune", "n_labeled": 1, "mean": m, "ci_low": m - 0.01}
            | {"ci_high": m + 0.01, "n_pairs": 60}
            for mode, m in means.items()
        ]
        cells.append(
            {"finetune": "federated", "readout": "probe", "n_labeled": 1, "mean": 9.0, "n_pairs": 60}
        )
        Path(f"{prefix}{suffix}").write_text(json.dumps({"cells": cells}))
    return str(prefix)


def test_the_choice_reads_validation_only_and_reports_test(tmp_path):
    # scale 1 wins locally on validation; 0.3 federated; 0.3's test is best in both and must not decide
    one = outputs(tmp_path / "s1", {"local": 0.02, "federated": 0.01}, {"local": -0.05, "federated": 0.00})
    third = outputs(tmp_path / "s03", {"local": 0.01, "federated": 0.04}, {"local": 0.30, "federated": 0.30})
    out = tmp_path / "choice"
    argv = [f"1={one}", f"0.3={third}", "--setting", "finetune_encoder_lr_scale", "--out", str(out)]
    assert choose_recipe.main(argv) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["chosen"] == {"federated": "0.3", "local": "1"}
    table = out.with_suffix(".md").read_text()
    assert "| local | **1** | **+0.020 [0.010, 0.030]** | -0.050 [-0.060, -0.040] |" in table
    assert "| federated | **0.3** | **+0.040 [0.030, 0.050]** | +0.300 [0.290, 0.310] |" in table
    assert "+9.000" not in table  # the probe's cells are not recipes of full fine-tuning


def test_a_recipe_missing_a_mode_or_a_split_is_refused(tmp_path):
    both = outputs(tmp_path / "a", {"local": 0.0, "federated": 0.0}, {"local": 0.0, "federated": 0.0})
    local = outputs(tmp_path / "b", {"local": 0.0}, {"local": 0.0})
    with pytest.raises(ValueError, match=r"'b' has no validation pairs for \['federated'\]"):
        choose_recipe.main([f"a={both}", f"b={local}", "--setting", "x", "--out", str(tmp_path / "c")])
    with pytest.raises(FileNotFoundError, match="validation split"):
        choose_recipe.main([f"a={tmp_path / 'none'}", "--setting", "x", "--out", str(tmp_path / "c")])
