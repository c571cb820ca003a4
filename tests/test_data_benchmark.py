"""The phantom-difficulty calibration: its oracle is exact, and it writes the learning curves it measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "phantom_difficulty.py"
spec = importlib.util.spec_from_file_location("phantom_difficulty", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def brute_force(image: np.ndarray, target: np.ndarray) -> float:
    values = np.unique(image)
    best = 0.0
    for i, lo in enumerate(values):
        for hi in values[i:]:
            inside = (image >= lo) & (image <= hi)
            best = max(best, 2 * (inside & target).sum() / (inside.sum() + target.sum()))
    return best


def test_oracle_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        image = rng.integers(0, 15, size=80)
        target = ((image > 4) & (image < 9)) ^ (rng.random(80) < 0.2)
        assert abs(bench.best_interval_dice(image, target) - brute_force(image, target)) < 1e-12
    assert bench.best_interval_dice(np.arange(5), np.zeros(5, bool)) == 0.0


def test_writes_calibration(tmp_path):
    out = tmp_path / "difficulty.json"
    args = ["--name", "tiny", "--difficulty", "realistic", "--set", "heart_rotation_deg=40.0", "--sites", "1"]
    args += ["--patients-per-site", "2", "--val-per-site", "1", "--budgets", "1", "--seeds", "0"]
    bench.main([*args, "--steps", "2", "--steps-per-round", "1", "--plateau-last", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["benchmark"] == "phantom_difficulty_calibration" and result["chosen"] is None
    (candidate,) = result["candidates"]
    assert (
        candidate["difficulty"]["heart_rotation_deg"] == 40.0 and candidate["difficulty_base"] == "realistic"
    )
    curve = candidate["curves"]["1"]["0"]
    assert [p["steps"] for p in curve] == [1, 2] and set(curve[0]["sites"]) == {"site-1"}
    assert all(0.0 <= p["dice_mean"] <= 1.0 for p in curve)
    assert candidate["plateau"]["1"]["mean"] == curve[-1]["dice_mean"]
    assert candidate["plateau"]["1"]["published"] == 0.445
    assert 0.0 < candidate["intensity_oracle_validation"]["whole_image"]["dice_mean"] < 1.0
    assert "--name tiny" in candidate["command"]
    merged = tmp_path / "merged.json"
    bench.main(["--merge", str(out), "--name", "tiny", "--choose", "--out", str(merged)])
    assert json.loads(merged.read_text())["chosen"] == "tiny"
