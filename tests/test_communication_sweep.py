"""benchmarks/communication_sweep.py end to end at a tiny size: runs, resumption, the summary's numbers."""

import json
from dataclasses import replace
from pathlib import Path

import communication_sweep as sweep  # benchmarks/ is on the path (conftest)
import numpy as np
import pytest

from fedcontrast.bench.protocol import PROFILES, BenchConfig
from fedcontrast.methods.base import select
from fedcontrast.methods.registry import get_method


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_sweep_runs_bytes_and_dice_settings_resumes_and_summarises_from_the_runs(tmp_path):
    quick = {**PROFILES["quick"], "methods": [], "pretrain_steps": 4, "pretrain_rounds": 2}
    config = BenchConfig(**quick)
    ref, half = sweep.REFERENCE, "fclopt_ptnu_dp fp16"
    schedule = [("fedbyol", 0), ("fedbyol fp16", 0), (ref, 0), (half, 0), ("fclopt_ptnu", 0)]
    out = tmp_path / "sweep"
    entries, skipped = sweep.run_sweep(config, out, schedule)
    assert not skipped and [e["setting"] for e in entries] == [name for name, _ in schedule]
    assert entries[0]["scores"] is None and len(entries[2]["scores"]) == config.sites

    meta = {"command": "test", "environment": {"date": "today", "cpu": "cpu"}, "main_commit": "x"}
    meta |= {"wall_min": 0.0, "load_average_start": 0.0, "load_average_end": 0.0, "not_run": []}
    summary = sweep.write_report(entries, config, tmp_path / "communication", meta)
    rows = summary["settings"]

    # bytes: float16 halves every floating-point weight; integer counters travel as they are
    initial = select(get_method("fedbyol").trainer.initial_message(config.pretrain_config(0)), "weights")
    full = sum(v.nbytes for v in initial.values())
    halved = sum(v.nbytes // 2 if v.dtype.kind == "f" else v.nbytes for v in initial.values())
    assert rows["fedbyol"]["bytes_per_site_round"]["weights_up"] == full
    assert rows["fedbyol fp16"]["bytes_per_site_round"]["weights_up"] == halved
    assert rows["fedbyol"]["local_steps_per_round"] == 1 and rows[ref]["local_steps_per_round"] == 2
    fedbyol = rows["fedbyol"]["bytes_per_site_round"]["total"]
    for row in rows.values():
        assert row["fedbyol_ratio"] == pytest.approx(row["bytes_per_site_round"]["total"] / fedbyol)
        assert row["floor_ratio"] == pytest.approx(
            row["bytes_per_site_round"]["total"] / summary["floor_bytes_per_site_round"]
        )
    assert rows[ref]["uploads"] is not None and rows["fedbyol"]["uploads"] is None
    # one local step a round (bytes-only) sends what two do: FCLOpt+PTNU's weights and features
    # per round equal those of FCLOpt+PTNU+DP's full pre-training
    for kind in ("weights_up", "weights_down", "features_up", "features_down"):
        assert rows["fclopt_ptnu"]["bytes_per_site_round"][kind] == rows[ref]["bytes_per_site_round"][kind]

    # Dice: per-setting mean, and the paired difference site by site against the reference
    dice = {e["setting"]: {s["site"]: s["dice_mean"] for s in e["scores"]} for e in entries[2:4]}
    assert rows[ref]["dice"]["mean"] == pytest.approx(np.mean(list(dice[ref].values())))
    differences = [dice[half][site] - dice[ref][site] for site in dice[ref]]
    paired = rows[half]["dice_paired"]
    assert paired["mean"] == pytest.approx(np.mean(differences)) and paired["n_pairs"] == config.sites
    assert paired["ci_low"] <= paired["mean"] <= paired["ci_high"] and "dice_paired" not in rows[ref]
    report = (tmp_path / "communication.md").read_text()
    assert "x federated BYOL's bytes" in report and "paired difference" in report
    assert json.loads((tmp_path / "communication.json").read_text())["settings"].keys() == rows.keys()

    # resumption: nothing re-runs under the same settings; new fine-tuning settings re-measure Dice only
    runs = out / "runs.jsonl"
    assert lines(runs) == 5
    same, _ = sweep.run_sweep(config, out, schedule)
    assert [e["record"]["wall_s"] for e in same] == [e["record"]["wall_s"] for e in entries]
    assert lines(runs) == 5
    longer = replace(config, finetune_steps=6, finetune_checkpoints=2)
    again, _ = sweep.run_sweep(longer, out, schedule)
    assert lines(runs) == 7
    assert [e["record"]["wall_s"] for e in again] == [e["record"]["wall_s"] for e in entries]  # kept
    assert again[2]["finetune"]["finetune_steps"] == 6
    with pytest.raises(ValueError, match="sites"):
        sweep.run_sweep(replace(config, sites=3), out, schedule)
