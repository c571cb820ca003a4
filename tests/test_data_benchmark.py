"""The phantom-difficulty benchmark: its oracle is exact, and it writes the results format."""

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


def test_writes_results(tmp_path):
    out = tmp_path / "difficulty.json"
    bench.main(["--size", "small", "--sites", "1", "--patients-per-site", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"dataset", "config", "environment", "results", "rows"} <= set(result)
    assert result["results"]["volumes"] == 2 and len(result["rows"]) == 2
    assert set(result["rows"][0]["dice"]) == {"RV", "MYO", "LV"}
    assert 0.0 < result["results"]["whole_image"]["dice_mean"] < 1.0
