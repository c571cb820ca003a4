"""The pre-training sweep: it chooses on the validation rows only, on the seeds every variant
ran, and refuses folders that are not one sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pretrain_sweep  # benchmarks/ is on the path (conftest)
import pytest

SITES = ("site-1", "site-2")
SPLITS = ("validation", "test")


def variant(
    folder: Path,
    overrides: dict,
    gains: dict,
    seeds=(0, 1),
    validation: str = "all",
    probe_gains: dict | None = None,
) -> Path:
    """A run folder: random init scores 0.4 everywhere; fcl adds ``gains[(split, mode)]``
    (and 0.1 more on seed 2, so a seed only one variant ran would change its mean), and
    ``probe_gains[split]`` in the federated frozen-encoder probe where that is given."""
    cells = [
        ("finetune", mode, split, gains[split, mode]) for mode in ("local", "federated") for split in SPLITS
    ]
    cells += [("probe", "federated", split, gain) for split, gain in (probe_gains or {}).items()]
    rows = []
    for seed in seeds:
        for site in SITES:
            for readout, mode, split, cell_gain in cells:
                for steps in (48, 96):  # only the final checkpoint counts
                    gain = cell_gain + 0.1 * (seed == 2) if steps == 96 else 0.5
                    for method, dice in (("random_init", 0.4), ("fcl", 0.4 + gain)):
                        rows.append(
                            {
                                "method": method,
                                "finetune": mode,
                                "n_labeled": 1,
                                "seed": seed,
                                "site": site,
                                "dice_mean": dice,
                                "readout": readout,
                                "eval_split": split,
                                "finetune_steps": steps,
                                "unit": f"{method}|{seed}|{mode}|1|{readout}",
                            }
                        )
    folder.mkdir(parents=True)
    config = {
        "methods": ["random_init", "fcl"],
        "seeds": list(seeds),
        "finetune_lr": 3e-3,
        "pretrain_overrides": overrides,
        "validation": validation,
    }
    (folder / "bench_config.json").write_text(json.dumps(config))
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_choice_reads_validation_only_on_the_common_seeds(tmp_path):
    # defaults: validation +0.02 / +0.04 (score 0.03), test poor; lr: validation +0.05 / 0.00
    # (score 0.025) but the best test; lr also ran seed 2, which would lift its validation score
    defaults = variant(
        tmp_path / "a",
        {},
        {
            ("validation", "local"): 0.02,
            ("validation", "federated"): 0.04,
            ("test", "local"): -0.05,
            ("test", "federated"): -0.05,
        },
    )
    lr = variant(
        tmp_path / "b",
        {"lr": 3e-3},
        {
            ("validation", "local"): 0.05,
            ("validation", "federated"): 0.0,
            ("test", "local"): 0.2,
            ("test", "federated"): 0.2,
        },
        seeds=(0, 1, 2),
    )
    out = tmp_path / "out" / "sweep"
    pretrain_sweep.main([str(defaults), str(lr), "--n-boot", "200", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["chosen"] == "defaults" and result["choice_seeds"] == [0, 1]
    scores = {v["variant"]: v["score"] for v in result["variants"]}
    assert scores == pytest.approx({"defaults": 0.03, '{"lr":0.003}': 0.025})
    test = {v["variant"]: v["test"]["local"] for v in result["variants"]}
    assert test['{"lr":0.003}']["n_seeds"] == 3  # test differences use every seed the variant ran
    assert test['{"lr":0.003}']["mean"] == pytest.approx((0.2 * 4 + 0.3 * 2) / 6)
    text = out.with_suffix(".md").read_text()
    assert "**Chosen: `defaults`.**" in text and "--n-boot 200" in text
    assert "| probe" not in text  # no run has probe rows, so no probe columns


def test_the_probe_is_reported_beside_the_choice_and_not_read_by_it(tmp_path):
    fine = {("validation", "local"): 0.02, ("validation", "federated"): 0.02}
    fine |= {("test", mode): 0.0 for mode in ("local", "federated")}
    plain = variant(tmp_path / "a", {}, fine, probe_gains={"validation": -0.1, "test": -0.2})
    better_probe = {**fine, ("validation", "local"): 0.0}
    other = variant(
        tmp_path / "b", {"temperature": 0.5}, better_probe, probe_gains={"validation": 0.3, "test": 0.25}
    )
    out = tmp_path / "out" / "sweep"
    pretrain_sweep.main([str(plain), str(other), "--n-boot", "200", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["chosen"] == "defaults"  # the probe's +0.3 on validation does not choose
    probe = {v["variant"]: v["probe"] for v in result["variants"]}
    assert set(probe["defaults"]["validation"]) == {"federated"}
    assert probe["defaults"]["test"]["federated"]["mean"] == pytest.approx(-0.2)
    assert probe['{"temperature":0.5}']["validation"]["federated"]["mean"] == pytest.approx(0.3)
    text = out.with_suffix(".md").read_text()
    assert "probe (federated), validation | probe (federated), test |" in text
    assert "+0.250" in text and "(2 seeds)" in text


def test_folders_that_are_not_one_sweep_are_refused(tmp_path):
    gains = {(s, m): 0.0 for s in ("validation", "test") for m in ("local", "federated")}
    a = variant(tmp_path / "a", {}, gains)
    unscored = variant(tmp_path / "b", {"lr": 3e-3}, gains, validation="random_init")
    with pytest.raises(ValueError, match="without --validation all"):
        pretrain_sweep.main([str(a), str(unscored), "--out", str(tmp_path / "out")])
    other = variant(tmp_path / "c", {"lr": 3e-3}, gains)
    config = json.loads((other / "bench_config.json").read_text())
    (other / "bench_config.json").write_text(json.dumps({**config, "finetune_lr": 1e-3}))
    with pytest.raises(ValueError, match="differ in finetune_lr"):
        pretrain_sweep.main([str(a), str(other), "--out", str(tmp_path / "out")])


def test_a_variant_is_named_by_its_overrides_and_its_cine_series():
    assert pretrain_sweep.label({"pretrain_overrides": {}}) == "defaults"
    assert pretrain_sweep.label({"pretrain_overrides": {}, "cine": True}) == "cine"
    assert pretrain_sweep.label({"pretrain_overrides": {"lr": 0.003}, "cine": True}) == '{"lr":0.003} + cine'
