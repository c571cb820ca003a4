"""The phantom-difficulty calibration: its oracle is exact, and it writes the learning curves it measured."""

from __future__ import annotations

import json

import numpy as np
import phantom_difficulty as bench  # benchmarks/ is on the path (conftest)


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


def test_records_random_init_curves_of_a_bench_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {"difficulty": "realistic", "size": "small", "sites": 2, "patients_per_site": 24,
              "validation_per_site": 2, "test_per_site": 2, "data_seed": 0, "bundle": {"init_filters": 8},
              "finetune_batch_samples": 8, "finetune_steps": 20, "finetune_checkpoints": 2}  # fmt: skip
    (run / "bench_config.json").write_text(json.dumps(config))
    rows = [
        {"method": method, "finetune": mode, "readout": "finetune", "eval_split": split, "n_labeled": n,
         "seed": seed, "site": site, "finetune_steps": steps, "dice_mean": 0.1 * seed + steps / 100 + n / 10}
        for method in ("random_init", "fcl") for mode in ("federated", "local")
        for split in ("validation", "test") for n in (1, 8) for seed in (0, 1) for site in ("a", "b")
        for steps in (10, 20)
    ]  # fmt: skip
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "difficulty.json"
    bench.main(["--name", "bench", "--from-bench", str(run), "--plateau-last", "1", "--out", str(out)])
    (candidate,) = json.loads(out.read_text())["candidates"]
    assert candidate["curves"]["8"]["1"] == [{"steps": 10, "dice_mean": 1.0}, {"steps": 20, "dice_mean": 1.1}]
    assert candidate["plateau"]["1"] == {"mean": 0.35, "per_seed": {"0": 0.3, "1": 0.4}, "published": 0.445}
    assert candidate["finetune"]["steps_per_round"] == 10 and candidate["data"]["patients_per_site"] == 24
    assert candidate["difficulty_base"] == "realistic" and "--from-bench" in candidate["command"]
