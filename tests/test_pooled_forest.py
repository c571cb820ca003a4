"""One figure of pooled differences: every entry's cells in the table, one label budget per figure."""

from __future__ import annotations

import json
from pathlib import Path

import pooled_forest
import pytest


def pooled(path: Path, n_labeled: int, mean: float) -> Path:
    """A pooled_difference.py result with a validation and a test cell of local fine-tuning only."""
    cell = {"mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.02, "seed_ci_low": mean - 0.02}
    cell |= {"seed_ci_high": mean + 0.03, "n_pairs": 60}
    result = {
        "command": f"python benchmarks/pooled_difference.py ... --out {path.stem}",
        "method": "fcl",
        "n_labeled": n_labeled,
        "cells": {"finetune": {"validation": {"local": cell}, "test": {"local": cell}}},
    }
    path.write_text(json.dumps(result))
    return path


def test_every_entry_and_cell_is_drawn_and_tabled(tmp_path):
    a, b = pooled(tmp_path / "a.json", 1, 0.012), pooled(tmp_path / "b.json", 1, 0.065)
    out = tmp_path / "forest"
    assert pooled_forest.main([f"FCL={a}", f"fedmotion={b}", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert "against the target (+0.05)" in table
    row = "| FCL | validation | +0.012 [0.002, 0.032] (seeds [-0.008, 0.042]; 60 pairs) | — | — | `a` |"
    assert row in table
    assert "| fedmotion | test | +0.065 [0.055, 0.085]" in table


def test_refuses_mixed_label_budgets_and_unnamed_entries(tmp_path):
    a, b = pooled(tmp_path / "a.json", 1, 0.0), pooled(tmp_path / "b.json", 2, 0.0)
    with pytest.raises(ValueError, match=r"different label budgets \[1, 2\]"):
        pooled_forest.main([f"a={a}", f"b={b}", "--out", str(tmp_path / "f")])
    with pytest.raises(ValueError, match="expected LABEL=PATH"):
        pooled_forest.main([str(a), "--out", str(tmp_path / "f")])


def test_a_recipe_choice_enters_with_each_modes_chosen_cells(tmp_path):
    def cell(mode: str, mean: float) -> dict:
        summary = {"mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01, "n_pairs": 60}
        summary |= {"seed_ci_low": mean - 0.02, "seed_ci_high": mean + 0.02}
        return {"finetune": mode, "readout": "finetune", "n_labeled": 1, **summary}

    def recipe(local: float, federated: float) -> dict:
        by_mode = {"local": cell("local", local), "federated": cell("federated", federated)}
        return {"validation": by_mode, "test": by_mode}

    choice = {
        "benchmark": "choose_recipe",
        "command": "python benchmarks/choose_recipe.py ... --out choice_fedmotion",
        "chosen": {"local": "0.3", "federated": "1"},
        "recipes": {"1": recipe(0.035, 0.065), "0.3": recipe(0.055, 0.061)},
    }
    path = tmp_path / "choice.json"
    path.write_text(json.dumps(choice))
    out = tmp_path / "forest"
    assert pooled_forest.main([f"fedmotion, chosen={path}", "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    row = "| fedmotion, chosen | test | +0.055 [0.045, 0.065] (seeds [0.035, 0.075]; 60 pairs) | +0.065 ["
    assert row in table and table.count("| — | `choice_fedmotion` |") == 2  # no probe cell
