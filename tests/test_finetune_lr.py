"""The learning-rate choice: it scores random init's validation curves at the budget and at the
last checkpoint, picks the best, and refuses runs that differ in anything but the learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import finetune_lr
import pytest


def results(folder: Path, lr: float, local: list[float], federated: list[float], **config) -> Path:
    """A minimal results.json: random init's validation curves at N = 1 over 4 checkpoints."""
    steps = [24, 48, 72, 96]
    plateau = [
        {"mode": mode, "readout": "finetune", "n_labeled": 1, "steps": steps, "dice": dice}
        for mode, dice in (("local", local), ("federated", federated))
    ]
    plateau.append(
        {"mode": "federated", "readout": "probe", "n_labeled": 1, "steps": steps, "dice": [0.9] * 4}
    )
    document = {
        "config": {"finetune_lr": lr, "seeds": [0], "finetune_steps": 96} | config,
        "summary": {"random_init_plateau": plateau},
    }
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(document))
    return folder


def test_the_choice_is_the_best_mean_of_budget_and_last_checkpoint(tmp_path, capsys):
    slow = results(tmp_path / "slow", 1e-3, [0.1, 0.2, 0.3, 0.6], [0.1, 0.2, 0.3, 0.8])
    fast = results(tmp_path / "fast", 1e-2, [0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.6])
    out = tmp_path / "out"
    assert finetune_lr.main([str(slow), str(fast), "--at", "48", "--out", str(out)]) == 0
    document = json.loads((out / "finetune_lr.json").read_text())
    # slow: (0.2 + 0.2) / 2 at 48 and (0.6 + 0.8) / 2 last -> 0.45; fast: 0.55 and 0.55 -> 0.55
    assert document["scores"]["0.001"]["score"] == pytest.approx(0.45)
    assert document["scores"]["0.01"]["score"] == pytest.approx(0.55)
    assert document["chosen"] == 1e-2
    assert document["scores"]["0.001"]["shortfall_at_budget"] == pytest.approx(
        {"local N=1": 0.4, "federated N=1": 0.6}
    )
    assert "federated probe" not in json.dumps(
        document["curves"]
    )  # the probe's curve is not a fine-tuning one
    assert (out / "finetune_lr.png").stat().st_size > 0
    assert "chosen: 0.01" in capsys.readouterr().out


def test_runs_that_differ_in_another_setting_are_refused(tmp_path):
    a = results(tmp_path / "a", 1e-3, [0.1] * 4, [0.1] * 4)
    b = results(tmp_path / "b", 1e-2, [0.1] * 4, [0.1] * 4, finetune_steps=192)
    with pytest.raises(ValueError, match="differ in finetune_steps"):
        finetune_lr.main([str(a), str(b), "--at", "48", "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="checkpoint at 60"):
        finetune_lr.main([str(a), "--at", "60", "--out", str(tmp_path / "out")])
