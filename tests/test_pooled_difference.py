"""Pooling a column's paired differences over runs on different data seeds: every (data seed,
run seed) is its own unit, and only replications of one configuration pool."""

from __future__ import annotations

import json
from pathlib import Path

import pooled_difference
import pytest


def run(folder: Path, data_seed: int, gain: float, **config) -> Path:
    """A run folder: random init 0.4 + seed / 100 on both splits, fcl ``gain`` above it
    (on validation and test, federated full fine-tuning, N = 1, sites a and b, seeds 0 and 1)."""
    rows = []
    for split in ("validation", "test"):
        for seed in (0, 1):
            for site in ("site-a", "site-b"):
                for method, dice in (("random_init", 0.4 + seed / 100), ("fcl", 0.4 + seed / 100 + gain)):
                    rows.append(
                        {
                            "method": method,
                            "finetune": "federated",
                            "readout": "finetune",
                            "n_labeled": 1,
                            "seed": seed,
                            "site": site,
                            "dice_mean": dice,
                            "eval_split": split,
                            "finetune_steps": 96,
                            "unit": f"{method}|{seed}|federated|1|finetune",
                        }
                    )
    folder.mkdir()
    settings = {"methods": ["random_init", "fcl"], "seeds": [0, 1], "data_seed": data_seed} | config
    (folder / "bench_config.json").write_text(json.dumps(settings))
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_pairs_of_two_data_seeds_pool_as_separate_seeds(tmp_path):
    a, b = run(tmp_path / "a", 0, 0.02), run(tmp_path / "b", 1, 0.06)
    out = tmp_path / "pooled"
    pooled_difference.main([str(a), str(b), "--method", "fcl", "--n-boot", "200", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["data_seeds"] == [0, 1] and list(result["cells"]) == ["finetune"]
    for split in ("validation", "test"):
        cell = result["cells"]["finetune"][split]["federated"]
        assert cell["mean"] == pytest.approx(0.04)
        assert (cell["n_pairs"], cell["n_seeds"], cell["n_sites"]) == (8, 4, 2)
    assert "| full fine-tuning | federated | +0.040 [" in out.with_suffix(".md").read_text()


def test_runs_of_one_data_seed_or_other_settings_are_refused(tmp_path):
    a = run(tmp_path / "a", 0, 0.02)
    with pytest.raises(ValueError, match="share a data seed"):
        pooled_difference.pooled([a, run(tmp_path / "b", 0, 0.06)], "fcl", 1, n_boot=10)
    with pytest.raises(ValueError, match="finetune_lr"):
        pooled_difference.pooled([a, run(tmp_path / "c", 1, 0.06, finetune_lr=1e-3)], "fcl", 1, n_boot=10)


def test_runs_pre_trained_from_one_encoder_file_per_phantom_pool_only_when_told(tmp_path):
    """Columns started from each phantom's own encoder (``initial_encoder``) differ in
    ``pretrain_overrides``: refused by default, pooled with ``--free ... pretrain_overrides``."""
    a = run(tmp_path / "a", 0, 0.02, pretrain_overrides={"initial_encoder": "d0/fedmotion_s{seed}.pt"})
    b = run(tmp_path / "b", 1, 0.06, pretrain_overrides={"initial_encoder": "d1/fedmotion_s{seed}.pt"})
    with pytest.raises(ValueError, match="pretrain_overrides"):
        pooled_difference.pooled([a, b], "fcl", 1, n_boot=10)
    free = ("data_seed", "methods", "pretrain_overrides")
    result = pooled_difference.pooled([a, b], "fcl", 1, n_boot=10, free=free)
    assert result["cells"]["finetune"]["test"]["federated"]["mean"] == pytest.approx(0.04)


def test_steps_scores_an_earlier_checkpoint_and_names_the_ones_there_are(tmp_path):
    """``--steps 48`` pairs the rows scored after 48 steps (here fcl level with random init), not
    the final checkpoint's (fcl 0.05 above it); a step count with no rows is refused."""
    folder = run(tmp_path / "a", 0, 0.05)
    final = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    earlier = [{**row, "finetune_steps": 48, "dice_mean": 0.4 + row["seed"] / 100} for row in final]
    with open(folder / "rows.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in earlier)
    out = tmp_path / "at48"
    pooled_difference.main(
        [str(folder), "--method", "fcl", "--n-boot", "200", "--steps", "48", "--out", str(out)]
    )
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["finetune_steps"] == 48
    assert result["cells"]["finetune"]["test"]["federated"]["mean"] == pytest.approx(0.0)
    assert "the checkpoint after 48 fine-tuning steps" in out.with_suffix(".md").read_text()
    default = pooled_difference.pooled([folder], "fcl", 1, n_boot=10)
    assert default["finetune_steps"] is None
    assert default["cells"]["finetune"]["test"]["federated"]["mean"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"checkpoints are \[48, 96\]"):
        pooled_difference.pooled([folder], "fcl", 1, n_boot=10, steps=50)
