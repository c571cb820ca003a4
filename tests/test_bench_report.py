"""The label-efficiency report end to end on a fake run folder (no training)."""

import json
import runpy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedcontrast.bench.protocol import METHOD_DEFAULTS_FILE
from fedcontrast.bench.report import (
    CROSS_SITE,
    cross_site_rows,
    curves_table,
    difference_cells,
    format_difference,
    headline_rows,
    merge_runs,
    normalise_rows,
    plateau_rows,
    pretrain_curves,
    write_fcl_vs_baselines,
    write_report,
)

CLASSES = ("liver", "spleen")  # not the cardiac names: the report must take them from the rows
STEPS = (20, 50, 100)
BENCH_REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report.py"


@dataclass
class FakeConfig:
    """The settings the report reads (a dataclass like ``BenchConfig``)."""

    methods: list[str] = field(default_factory=lambda: ["random_init", "fcl", "fedsimclr"])
    budgets: list[int] = field(default_factory=lambda: [1, 2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sites: int = 2
    finetune_steps: int = STEPS[-1]
    readouts: list[str] = field(default_factory=lambda: ["finetune", "probe"])
    probe_modes: list[str] = field(default_factory=lambda: ["federated"])


def fake_run(
    folder: Path,
    config: FakeConfig,
    effect: dict[str, float],
    modes: tuple[str, ...] = ("local", "federated"),
    sites: tuple[str, ...] = ("site-1", "site-2"),
) -> list[dict]:
    """Write ``bench_config.json``, ``rows.jsonl`` and pre-training records as the protocol does.

    Dice of a method = a saturating curve in the steps (random init's validation curve flattens
    before the budget) + ``effect[method]`` + a seed offset shared by all methods + noise.
    """
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_config.json").write_text(json.dumps(asdict(config)))
    rows = []
    for method in config.methods:
        for seed in config.seeds:
            for mode in modes:
                for n in config.budgets:
                    for readout in ("finetune", "probe"):
                        for split in ("test", "validation"):
                            for steps in STEPS:
                                for i, site in enumerate(sites):
                                    base = (
                                        0.3 + 0.1 * n - 0.05 * (readout == "probe") + 0.03 * seed + 0.02 * i
                                    )
                                    dice = base * (1 - np.exp(-steps / 10)) + effect.get(method, 0.0)
                                    dice += rng.normal(0, 0.003)
                                    rows.append(
                                        {
                                            "unit": f"{method}|{seed}|{mode}|{n}",
                                            "method": method,
                                            "finetune": mode,
                                            "n_labeled": n,
                                            "seed": seed,
                                            "site": site,
                                            "dice_mean": dice,
                                            "dice": {c: dice + 0.01 * k for k, c in enumerate(CLASSES)},
                                            "hd95_mean": 10.0 - dice,
                                            "pretrain_bytes_up": 1000,
                                            "pretrain_bytes_down": 2000,
                                            "bytes_by_kind": {
                                                f"{k}_{d}": 1000
                                                * (k == "weights")
                                                * (method != "random_init")
                                                for k in ("weights", "target", "features")
                                                for d in ("up", "down")
                                            },
                                            "pretrain_wall_s": 3.0,
                                            "finetune_wall_s": 4.0,
                                            "peak_rss_mb": 500.0,
                                            "finetune_steps": steps,
                                            "readout": readout,
                                            "eval_split": split,
                                        }
                                    )
    with open(folder / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for method in config.methods:
        if method == "random_init":
            continue
        for seed in config.seeds:
            curve = [
                {
                    "round": r,
                    "step": 10 * (r + 1),
                    "site": site,
                    "loss": 4.0 - 0.1 * r,
                    "uniformity": -0.1 * r,
                    **({"alignment": 1.0 - 0.05 * r} if method == "fcl" else {}),  # keys may be missing
                }
                for r in range(3)
                for site in sites
            ] + [
                {"round": r, "step": 10 * (r + 1), "site": "global", "partition_accuracy": 0.4 + 0.1 * r}
                for r in range(3)
            ]
            record = {"method": method, "seed": seed, "curve": curve, "samples_per_s": 12.5}
            out = folder / "pretrain" / f"{method}_s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "record.json").write_text(json.dumps(record))
    return rows


def test_report_end_to_end_meets_the_target(tmp_path):
    config = FakeConfig()
    rows = fake_run(tmp_path / "run", config, {"fcl": 0.08, "fedsimclr": -0.01})
    report = write_report(rows, config, tmp_path / "run", tmp_path / "out", n_boot=2000)
    text = report.read_text()
    assert (
        "**Target: FCL minus random init at N=1 >= +0.05 with the 95% interval above 0, in local and "
        "federated fine-tuning: met**" in text
    )
    for plot in ("dice_vs_n", "paired_differences", "dice_vs_steps", "pretrain_curves", "bytes"):
        assert (tmp_path / "out" / f"{plot}.png").stat().st_size > 0, plot
        assert f"]({plot}.png)" in text
    assert "every unit of the grid completed" in text
    assert "**100 optimiser steps**" in text
    assert "Reached in 8 of 8 measured" in text  # 2 modes x 2 readouts x 2 budgets
    assert "### Federated fine-tuning: liver Dice" in text and "RV" not in text
    assert "fedsimclr" in text and "| random_init |" in text

    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"dataset", "config", "environment", "rows", "summary"} <= set(document)
    # 864 rows: kept are the 144 final test rows, 144 earlier test checkpoints at N=1 and 144
    # validation rows of random init
    assert (len(rows), len(document["rows"])) == (864, 432)
    again = difference_cells(headline_rows(normalise_rows(document["rows"])), config.methods, n_boot=2000)
    assert format_difference(again["local", "finetune", "fcl", 1]) in text  # the file redraws the report
    assert {"finetune_steps", "readout", "eval_split", "dice"} <= set(document["rows"][0])
    summary = document["summary"]
    assert summary["target"]["met"] is True
    assert summary["final_steps"] == {
        f"{m}/{r}": 100 for m in ("local", "federated") for r in ("finetune", "probe")
    }
    cell = next(
        c
        for c in summary["paired_differences"]
        if (c["finetune"], c["readout"], c["method"], c["n_labeled"]) == ("local", "finetune", "fcl", 1)
    )
    assert cell["mean"] == pytest.approx(0.08, abs=0.005)
    assert cell["ci_low"] > 0.07 and (cell["n_pairs"], cell["n_seeds"], cell["n_sites"]) == (6, 3, 2)
    assert f"| fcl | {format_difference(cell)} |" in text  # the headline cell as written
    dice = next(
        c
        for c in summary["dice"]
        if (c["finetune"], c["readout"], c["method"], c["n_labeled"])
        == ("local", "finetune", "random_init", 1)
    )
    assert dice["std_seeds"] == pytest.approx(0.03, abs=0.005)  # the seed offset, not the sites' spread
    assert summary["pretraining"]["fcl"]["alignment"] == pytest.approx([1.0, 0.95, 0.9])
    assert all(v is None for v in summary["pretraining"]["fedsimclr"]["alignment"])  # absent, not invented
    assert summary["pretraining"]["fcl"]["partition_accuracy"] == pytest.approx([0.4, 0.5, 0.6])


def test_report_says_not_met_and_why(tmp_path):
    config = FakeConfig(methods=["random_init", "fcl"], budgets=[1])
    rows = fake_run(tmp_path / "run", config, {"fcl": 0.02}, modes=("federated",))
    text = write_report(rows, config, tmp_path / "run", tmp_path / "out", n_boot=500).read_text()
    assert "fine-tuning: not met** (local: no paired rows; federated: +0.020 [" in text
    # local fine-tuning did not run; the probe is configured for federated fine-tuning only
    assert "units missing" in text and "fcl|0|local|1|finetune" in text and "|local|1|probe" not in text


def test_a_cell_of_an_unfinished_run_says_how_many_seeds_it_holds(tmp_path):
    config = FakeConfig(methods=["random_init", "fcl"], budgets=[1])
    rows = fake_run(tmp_path / "run", config, {"fcl": 0.02}, modes=("local",))
    rows = [r for r in rows if not (r["method"] == "fcl" and r["seed"] == 2)]  # the run stopped there
    text = write_report(rows, config, tmp_path / "run", tmp_path / "out", n_boot=200).read_text()
    cells = [line for line in text.splitlines() if "[" in line or "±" in line]  # every mean cell
    fcl_rows = [line for line in cells if line.startswith("| fcl |")]
    random_init_rows = [line for line in cells if line.startswith("| random_init |")]
    assert len(fcl_rows) == 8 and all(line.endswith("(2 of 3 seeds) |") for line in fcl_rows)
    assert random_init_rows and not any("of 3 seeds" in line for line in random_init_rows)


def test_a_run_filled_on_two_machines_says_so_in_its_environment(tmp_path, monkeypatch):
    from fedcontrast.bench import environment as env

    config = FakeConfig(methods=["random_init", "fcl"], budgets=[1])
    rows = fake_run(tmp_path / "run", config, {"fcl": 0.02}, modes=("local",))
    machines = iter(
        [
            {"python": "3.11.7", "torch": "2.13.0", "cpu": "AMD EPYC", "gpu": None, "date": "2026-12-02"},
            {"python": "3.11.7", "torch": "2.13.0", "cpu": "Intel Xeon", "gpu": None, "date": "2026-12-03"},
        ]
    )
    monkeypatch.setattr(env, "environment", lambda: next(machines))
    env.record_call(tmp_path / "run", units=10)
    env.record_call(tmp_path / "run", units=4)
    write_report(rows, config, tmp_path / "run", tmp_path / "out", n_boot=100)
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())["environment"]
    assert recorded == {
        "python": "3.11.7",
        "torch": "2.13.0",
        "cpu": "AMD EPYC / Intel Xeon",
        "gpu": None,
        "date": "2026-12-02 to 2026-12-03",
        "calls": 2,
    }
    # a run that recorded nothing says the environment is the report writer's
    monkeypatch.undo()
    assert "recorded" in env.run_environment([tmp_path / "elsewhere"])


def test_plateau_not_reached_when_random_init_still_rises():
    rows = [
        {"method": "random_init", "finetune": "local", "readout": "finetune", "n_labeled": 1, "seed": 0,
         "site": "a", "eval_split": "validation", "finetune_steps": s, "dice_mean": d}
        for s, d in ((10, 0.2), (50, 0.5), (100, 0.7))
    ]  # fmt: skip
    (curve,) = plateau_rows(rows)
    assert (curve["half_steps"], curve["budget"]) == (50, 100)
    assert curve["gain"] == pytest.approx(0.2) and curve["plateau"] is False


def test_plateau_gain_is_the_second_half_trend_not_one_noisy_checkpoint():
    dice = (0.2, 0.5, 0.60, 0.58, 0.60, 0.58, 0.66)  # flat second half, a high last checkpoint
    rows = [
        {"method": "random_init", "finetune": "local", "readout": "finetune", "n_labeled": 1, "seed": 0,
         "site": "a", "eval_split": "validation", "finetune_steps": 10 * (i + 1), "dice_mean": d}
        for i, d in enumerate(dice)
    ]  # fmt: skip
    (curve,) = plateau_rows(rows)
    # least squares through (30, .60) .. (70, .66): slope 0.0012 a step, times 40 steps
    assert curve["half_steps"] == 30 and curve["gain"] == pytest.approx(0.048, abs=1e-6)
    assert curve["gain"] < dice[-1] - dice[2]


def test_pretrain_curves_average_sites_and_seeds():
    records = {
        "m": [
            {"curve": [{"round": 0, "site": "a", "loss": 1.0}, {"round": 0, "site": "b", "loss": 3.0}]},
            {"curve": [{"round": 0, "site": "a", "loss": 2.0}], "samples_per_s": 4.0},
        ],
        "no_curve": [{"sites": {}}],
    }
    curves = pretrain_curves(records)
    assert set(curves) == {"m"}
    assert curves["m"]["loss"] == [pytest.approx(2.0)] and curves["m"]["samples_per_s"] == 4.0


def test_curves_table_marks_rounds_that_did_not_measure_a_metric():
    # a decoder column: the base's rounds carry every metric, its decoder stage only the loss
    curve = [{"round": 0, "site": "a", "loss": 4.0, "alignment": 0.1}, {"round": 1, "site": "a", "loss": 0.5}]
    row = curves_table(pretrain_curves({"fcl+decoder": [{"curve": curve}]})).splitlines()[-1]
    assert "4.000 -> 0.500" in row and "0.100 -> —" in row and "nan" not in row


def test_runs_of_one_configuration_merge_and_others_are_refused(tmp_path):
    base = FakeConfig(methods=["random_init", "fcl"], budgets=[1], seeds=[0, 1])
    fake_run(tmp_path / "a", base, {"fcl": 0.08})
    later = FakeConfig(methods=["random_init", "fedsimclr"], budgets=[1], seeds=[0, 1])
    fake_run(tmp_path / "b", later, {"fedsimclr": 0.03})
    settings, rows, provenance = merge_runs([tmp_path / "a", tmp_path / "b"])
    assert settings["methods"] == ["random_init", "fcl", "fedsimclr"]
    assert provenance["sources"] == {
        "random_init": str(tmp_path / "a"),
        "fcl": str(tmp_path / "a"),
        "fedsimclr": str(tmp_path / "b"),
    }
    assert provenance["duplicates"]["random_init"]["folders"] == [str(tmp_path / "b")]
    assert provenance["duplicates"]["random_init"]["max_abs_dice_difference"] < 0.02
    assert sum(r["method"] == "random_init" for r in rows) == sum(r["method"] == "fcl" for r in rows)

    written = runpy.run_path(str(BENCH_REPORT))["main"](
        [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out"), "--n-boot", "200"]
    )
    text = written[0].read_text()
    assert "| fedsimclr | +0.03" in text and "| fcl | +0.08" in text
    assert "fedsimclr from `" in text and "random_init also ran in" in text

    write_fcl_vs_baselines(rows, SimpleNamespace(**settings), [tmp_path / "a"], tmp_path / "out")
    subset = json.loads((tmp_path / "out" / "fcl_vs_baselines.json").read_text())["rows"]
    assert subset and all((r["finetune_steps"], r["eval_split"]) == (100, "test") for r in subset)

    other = FakeConfig(methods=["random_init", "fedsimclr"], budgets=[1], seeds=[0, 1], sites=3)
    fake_run(tmp_path / "c", other, {})
    with pytest.raises(ValueError, match=r"different settings \(sites\)"):
        merge_runs([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match=r"no bench_config\.json"):
        merge_runs([tmp_path / "a", tmp_path / "nothing"])
    # recorded defaults of a method both folders use must agree (a folder without a record is not checked)
    recorded = {"supervised": {"lr": 1e-3}, "fcl": {"lr": 1e-3}}
    (tmp_path / "a" / METHOD_DEFAULTS_FILE).write_text(json.dumps(recorded))
    merge_runs([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "b" / METHOD_DEFAULTS_FILE).write_text(json.dumps({"supervised": {"lr": 3e-3}}))
    with pytest.raises(ValueError, match=r"other method defaults \(supervised\.lr: 0\.001 -> 0\.003\)"):
        merge_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="no rows to report"):
        write_report([], base, tmp_path / "a", tmp_path / "empty")


def test_cross_site_rows_average_the_other_sites_and_pair_on_the_training_site():
    """Three sites, one seed, N = 1: each model's Dice elsewhere is the mean over the two other
    sites; the difference against random init pairs the models of the same training site."""
    dice = {  # (method, trained at, tested at) -> Dice
        ("random_init", "a", "b"): 0.2, ("random_init", "a", "c"): 0.4,
        ("random_init", "b", "a"): 0.5, ("random_init", "b", "c"): 0.3,
        ("random_init", "c", "a"): 0.1, ("random_init", "c", "b"): 0.3,
        ("fcl", "a", "b"): 0.5, ("fcl", "a", "c"): 0.5,
        ("fcl", "b", "a"): 0.4, ("fcl", "b", "c"): 0.4,
        ("fcl", "c", "a"): 0.2, ("fcl", "c", "b"): 0.2,
    }  # fmt: skip
    base = {"seed": 0, "finetune": "local", "readout": "finetune", "n_labeled": 1}
    rows = [
        {
            **base,
            "method": m,
            "trained_site": a,
            "site": b,
            "finetune_steps": 96,
            "eval_split": CROSS_SITE,
            "dice_mean": d,
        }
        for (m, a, b), d in dice.items()
    ]
    rows.append(
        {**base, "method": "fcl", "site": "a", "finetune_steps": 96, "eval_split": "test", "dice_mean": 0.9}
    )
    rows.append(  # an earlier checkpoint is not the model scored
        {
            **base,
            "method": "fcl",
            "trained_site": "a",
            "site": "b",
            "finetune_steps": 48,
            "eval_split": CROSS_SITE,
            "dice_mean": 0.0,
        }
    )
    models = {(r["method"], r["site"]): r for r in cross_site_rows(rows)}
    assert set(models) == {(m, s) for m in ("random_init", "fcl") for s in "abc"}
    assert models["random_init", "a"]["dice_mean"] == pytest.approx(0.3)
    assert models["fcl", "c"]["dice_mean"] == pytest.approx(0.2) and models["fcl", "c"]["tested_sites"] == 2
    cell = difference_cells(list(models.values()), ["random_init", "fcl"], n_boot=200)[
        "local", "finetune", "fcl", 1
    ]
    # per training site: a 0.5 - 0.3, b 0.4 - 0.4, c 0.2 - 0.2
    assert cell["mean"] == pytest.approx(0.2 / 3) and cell["n_pairs"] == 3


def test_an_output_stem_keeps_its_dots_and_a_given_output_suffix_is_replaced():
    from fedcontrast.bench.report import output_file

    assert output_file(Path("enc/fedmotion_s0.3"), ".json") == Path("enc/fedmotion_s0.3.json")
    assert output_file(Path("enc/choice"), ".md") == Path("enc/choice.md")
    assert output_file(Path("results/federation_cost.json"), ".md") == Path("results/federation_cost.md")


def test_report_draws_no_pretraining_figure_when_no_round_measured_a_metric(tmp_path):
    # fedmotion's and the ceilings' records from before their loss was kept: rounds without metrics
    config = FakeConfig()
    rows = fake_run(tmp_path / "run", config, {"fcl": 0.08, "fedsimclr": -0.01})
    for file in (tmp_path / "run" / "pretrain").glob("*/record.json"):
        record = json.loads(file.read_text())
        record["curve"] = [{k: e[k] for k in ("round", "step", "site")} for e in record["curve"]]
        file.write_text(json.dumps(record))
    text = write_report(rows, config, tmp_path / "run", tmp_path / "out", n_boot=200).read_text()
    assert not (tmp_path / "out" / "pretrain_curves.png").exists()
    assert "](pretrain_curves.png)" not in text
