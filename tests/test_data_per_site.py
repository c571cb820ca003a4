"""The data-per-site ablation summary: it reads each run's paired differences, orders the runs by
patients per site, and refuses runs that differ in anything else."""

from __future__ import annotations

import json
from pathlib import Path

import data_per_site
import pytest


def results(folder: Path, patients: int, mean: float, **config) -> Path:
    """A minimal results.json of one run: fcl and random init's paired difference at N = 1."""
    cell = {"method": "fcl", "n_labeled": 1, "finetune": "federated", "readout": "probe", "mean": mean}
    cell |= {
        "ci_low": mean - 0.02,
        "ci_high": mean + 0.02,
        "seed_ci_low": mean - 0.03,
        "seed_ci_high": mean + 0.03,
    }
    cell |= {"std_seeds": 0.01, "n_seeds": 3, "n_sites": 4}
    other_n = {**cell, "n_labeled": 8, "mean": 0.5}
    document = {
        "config": {
            "patients_per_site": patients,
            "seeds": [0, 1, 2],
            "methods": ["fcl"],
            "pretrain_steps": 480,
        }
        | config,
        "summary": {
            "paired_differences": [other_n, cell],
            "pretraining": {"fcl": {"partition_accuracy": [0.4, None, 0.45]}},
        },
    }
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(document))
    return folder


def test_the_runs_are_ordered_by_patients_per_site_and_their_n1_cells_kept(tmp_path, capsys):
    big = results(tmp_path / "big", 96, 0.03)
    small = results(tmp_path / "small", 12, -0.01)
    assert data_per_site.main([str(big), str(small / "results.json"), "--out", str(tmp_path / "out")]) == 0
    document = json.loads((tmp_path / "out" / "data_per_site.json").read_text())
    assert [p["patients_per_site"] for p in document["points"]] == [12, 96]
    assert document["points"][1]["differences"]["federated probe"]["mean"] == 0.03
    assert document["points"][0]["differences"]["federated probe"]["ci_low"] == pytest.approx(-0.03)
    assert document["points"][1]["partition_accuracy_last_round"] == 0.45
    assert document["shared_config"] == {"pretrain_steps": 480}
    assert (tmp_path / "out" / "data_per_site.png").stat().st_size > 0
    assert (
        "96 patients/site, seeds [0, 1, 2]: federated probe +0.030 [+0.010, +0.050]"
        in capsys.readouterr().out
    )


def test_runs_that_differ_in_another_setting_are_refused(tmp_path):
    a = results(tmp_path / "a", 12, 0.0)
    b = results(tmp_path / "b", 96, 0.0, pretrain_steps=96)
    with pytest.raises(ValueError, match="differ in pretrain_steps: not one ablation"):
        data_per_site.main([str(a), str(b), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        data_per_site.main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_a_setting_missing_from_an_older_run_counts_as_its_default(tmp_path):
    older = {"config": {"seeds": [0], "finetune_lr": 3e-3}}  # saved before `validation` existed
    newer = {"config": {"seeds": [1], "finetune_lr": 3e-3, "validation": "random_init"}}
    data_per_site.check_comparable({tmp_path / "older": older, tmp_path / "newer": newer})
    tuned = {"config": {**newer["config"], "validation": "all"}}
    with pytest.raises(ValueError, match="differ in validation"):
        data_per_site.check_comparable({tmp_path / "older": older, tmp_path / "tuned": tuned})
