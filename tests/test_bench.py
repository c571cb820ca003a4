"""The benchmark's row format, resumption and reports (no training: rows are synthetic or stubbed)."""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from conftest import inline_pool

from fedcontrast.bench import protocol
from fedcontrast.bench.protocol import (
    PROFILES,
    SMALL_BUNDLE,
    BenchConfig,
    FinetuneUnit,
    completed_units,
    finetune_units,
)
from fedcontrast.bench.report import (
    RESULT_KEYS,
    ceiling_paragraph,
    ceiling_share,
    ordering_sentences,
    table,
    target_verdict,
    verdict_line,
    write_communication,
    write_fcl_vs_baselines,
    write_report,
)

SITES = ("site-1", "site-2")


def fake_row(method: str, mode: str, n: int, seed: int, site: str, dice: float) -> dict:
    """A row as finetune_unit writes it."""
    kinds = {
        f"{k}_{d}": 1000 * (k == "weights") for k in ("weights", "target", "features") for d in ("up", "down")
    }
    return {
        "unit": FinetuneUnit(method, seed, mode, n).key,
        "method": method,
        "finetune": mode,
        "n_labeled": n,
        "seed": seed,
        "site": site,
        "dice_mean": dice,
        "dice": {"RV": dice, "MYO": dice, "LV": dice},
        "hd95_mean": 5.0,
        "pretrain_bytes_up": 1000,
        "pretrain_bytes_down": 1000,
        "bytes_by_kind": kinds,
        "pretrain_wall_s": 1.0,
        "finetune_wall_s": 2.0,
        "peak_rss_mb": 300.0,
    }


@pytest.fixture()
def config() -> BenchConfig:
    return BenchConfig(methods=["random_init", "fcl", "fedsimclr"], budgets=[1, 2], seeds=[0, 1], sites=2)


@pytest.fixture()
def rows(config) -> list[dict]:
    """FCL better than random init better than FedSimCLR, everywhere; site-2 scores 0.1 higher."""
    quality = {"fcl": 0.6, "random_init": 0.4, "fedsimclr": 0.3}
    return [
        fake_row(m, mode, n, seed, site, quality[m] + 0.05 * n + 0.1 * (site == "site-2"))
        for m in config.methods
        for mode in ("local", "federated")
        for n in config.budgets
        for seed in config.seeds
        for site in SITES
    ]


def test_command_line_options_override_the_profile():
    import argparse

    from fedcontrast.bench import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "bench",
            "--profile",
            "cpu",
            "--difficulty",
            "standard",
            "--patients-per-site",
            "12",
            "--data-seed",
            "1",
            "--cine",
            "--finetune-lr",
            "1e-2",
            "--pretrain-overrides",
            '{"lr": 3e-3, "augment": {"rotate_deg": 30}}',
            "--validation",
            "all",
            "--bundle-overrides",
            '{"init_filters": 16}',
        ]
    )
    config = config_from_args(args)
    assert config.bundle == {**PROFILES["cpu"].get("bundle", SMALL_BUNDLE), "init_filters": 16}
    assert (config.difficulty, config.patients_per_site, config.finetune_steps) == ("standard", 12, 96)
    assert config.finetune_lr == 1e-2 and config.validation == "all"
    assert config.data_seed == 1 and config.cine is True
    assert config_from_args(parser.parse_args(["bench"])).cine is False
    assert config.pretrain_config(0)["lr"] == 3e-3 and config.pretrain_config(0)["augment"] == {
        "rotate_deg": 30
    }
    wrong_options = (
        ["--difficulty", "impossible"],
        ["--pretrain-overrides", "[1]"],
        ["--bundle-overrides", "16"],
        ["--validation", "some"],
    )
    for wrong in wrong_options:
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", *wrong])


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(tmp_path, config):
    saved = {k: v for k, v in asdict(config).items() if k != "validation"}  # an older bench's run
    (tmp_path / "bench_config.json").write_text(json.dumps(saved))
    protocol.check_resumable(config, tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(validation\)"):
        protocol.check_resumable(replace(config, validation="all"), tmp_path)


def pretrained(folder: Path, methods: list[str], seeds: list[int]) -> None:
    """Pre-training units marked done in ``folder`` (their record only)."""
    for m in methods:
        for s in seeds:
            unit = folder / "pretrain" / f"{m}_s{s}"
            unit.mkdir(parents=True)
            (unit / "record.json").write_text(json.dumps({"sites": {}, "wall_s": 0, "peak_rss_mb": 0}))


def test_a_run_folder_refuses_to_resume_after_a_method_default_changed(tmp_path, config, monkeypatch):
    config.methods = ["random_init", "fedmotion"]
    pretrained(tmp_path, ["fedmotion"], config.seeds)
    submitted = fake_pool(monkeypatch)
    protocol.run_benchmark(config, tmp_path, run_budgets=[1])
    recorded = json.loads((tmp_path / protocol.METHOD_DEFAULTS_FILE).read_text())
    assert set(recorded) == {"fedmotion", "supervised"}  # fine-tuning's defaults too
    assert recorded["fedmotion"]["phase_bins"] == 6 and recorded["supervised"]["lr"] == 1e-3
    # as a run folder started before fedmotion's phase_bins default went from 0 (every frame) to 6
    recorded["fedmotion"]["phase_bins"] = 0
    (tmp_path / protocol.METHOD_DEFAULTS_FILE).write_text(json.dumps(recorded))
    submitted.clear()
    with pytest.raises(ValueError, match=r"fedmotion\.phase_bins: 0 -> 6"):
        protocol.run_benchmark(config, tmp_path)
    assert submitted == [], "nothing may run under the changed default"
    # a key the method gained after the folder was recorded is not a change
    del recorded["fedmotion"]["phase_bins"]
    (tmp_path / protocol.METHOD_DEFAULTS_FILE).write_text(json.dumps(recorded))
    protocol.run_benchmark(config, tmp_path)
    assert submitted and {unit.n_labeled for _, unit in submitted} == set(config.budgets) - {1}


def test_a_run_folder_from_before_defaults_were_recorded_resumes_with_a_warning(
    tmp_path, config, rows, monkeypatch, caplog
):
    config.methods = ["random_init"]
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n")
    fake_pool(monkeypatch)
    protocol.run_benchmark(config, tmp_path)
    assert f"no {protocol.METHOD_DEFAULTS_FILE}" in caplog.text and "cannot be" in caplog.text
    assert json.loads((tmp_path / protocol.METHOD_DEFAULTS_FILE).read_text()) == protocol.method_defaults(
        ["supervised"]
    )


def test_used_methods_are_fine_tuning_and_each_columns_pretraining():
    columns = ["random_init", "supervised_ceiling", "fcl+decoder", "fedmotion"]
    used = protocol.used_methods(BenchConfig(methods=columns))
    assert used == ["fcl", "fedmotion", "local_decoder", "supervised"]


def test_units_come_smallest_budget_first_and_cover_the_grid(config):
    units = finetune_units(config)
    # local and federated fine-tuning, plus the federated frozen-encoder probe
    assert len(units) == len(config.methods) * 3 * len(config.budgets) * len(config.seeds)
    assert [u.n_labeled for u in units] == sorted(u.n_labeled for u in units)
    assert len({u.key for u in units}) == len(units)


def test_resumption_skips_units_already_in_the_rows_file(tmp_path, config, rows, monkeypatch):
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    assert completed_units(rows_file) == {rows[0]["unit"], rows[2]["unit"]}

    pretrained(tmp_path, ["fcl", "fedsimclr"], config.seeds)
    submitted = fake_pool(monkeypatch)
    protocol.run_benchmark(config, tmp_path)
    names = {name for name, _ in submitted}
    assert names == {"finetune_unit"}, "completed pre-training units must not run again"
    keys = [unit.key for _, unit in submitted]
    assert rows[0]["unit"] not in keys and rows[2]["unit"] not in keys
    assert len(keys) == len(finetune_units(config)) - 2
    # a second call finds everything done, submits nothing and records no call
    submitted.clear()
    protocol.run_benchmark(config, tmp_path)
    assert submitted == []
    calls = json.loads((tmp_path / "environment.json").read_text())["calls"]
    assert [call["units"] for call in calls] == [len(keys)]


def fake_pool(monkeypatch) -> list[tuple[str, FinetuneUnit]]:
    """Units recorded and answered with a fake row instead of training (see conftest.inline_pool)."""

    def fake(fn, args):
        unit = args[1]
        row = fake_row(unit.method, unit.mode, unit.n_labeled, unit.seed, "site-1", 0.5)
        return [{**row, "unit": unit.key}]

    submitted = inline_pool(monkeypatch, fake)
    monkeypatch.setattr(protocol, "prepare_splits", lambda config, out, *a: {n: {} for n in config.budgets})
    return submitted


def test_run_budgets_runs_only_those_units_and_a_later_call_runs_the_rest(tmp_path, config, monkeypatch):
    config.methods = ["random_init"]
    submitted = fake_pool(monkeypatch)
    largest = max(config.budgets)
    protocol.run_benchmark(config, tmp_path, run_budgets=[largest])
    assert submitted and {unit.n_labeled for _, unit in submitted} == {largest}
    first_call = len(submitted)
    submitted.clear()
    protocol.run_benchmark(config, tmp_path)
    assert {unit.n_labeled for _, unit in submitted} == set(config.budgets) - {largest}
    # each call that ran units recorded the machine it ran on
    calls = json.loads((tmp_path / "environment.json").read_text())["calls"]
    assert [call["units"] for call in calls] == [first_call, len(submitted)]
    assert all({"cpu", "torch", "started"} <= set(call) for call in calls)
    with pytest.raises(ValueError, match="not among the configured"):
        protocol.run_benchmark(config, tmp_path, run_budgets=[largest + 100])


def test_a_torn_last_row_is_dropped_on_resume_and_a_corrupt_row_is_named(tmp_path, rows, caplog):
    """A run killed while appending leaves an incomplete last line: resuming drops it (with a
    warning naming file and line) before appending; a bad line elsewhere is an error naming it."""
    rows_file = tmp_path / "rows.jsonl"
    whole = "".join(json.dumps(r) + "\n" for r in rows[:2])
    rows_file.write_text(whole + json.dumps(rows[2])[:40])
    assert [r["unit"] for r in protocol.load_rows(rows_file)] == [rows[0]["unit"], rows[1]["unit"]]
    assert rows_file.read_text().endswith(json.dumps(rows[2])[:40]), "a plain read leaves the file alone"
    with caplog.at_level("WARNING", logger=protocol.__name__):
        assert completed_units(rows_file) == {rows[0]["unit"], rows[1]["unit"]}
    assert f"{rows_file}:3: ignoring an incomplete last line" in caplog.text
    assert rows_file.read_text() == whole
    with open(rows_file, "a") as f:  # what the resumed run appends
        f.write(json.dumps(rows[2]) + "\n")
    assert protocol.load_rows(rows_file) == rows[:3]
    # a complete last row without its newline gets one, so the next row starts its own line
    rows_file.write_text(whole.rstrip("\n"))
    assert completed_units(rows_file) == {rows[0]["unit"], rows[1]["unit"]}
    assert rows_file.read_text() == whole
    for text, line in [(whole + "{torn\n" + whole, 3), (whole + "{torn\n", 3), ("{torn" + "\n" + whole, 1)]:
        rows_file.write_text(text)
        with pytest.raises(ValueError, match=rf"^{rows_file}:{line} is not a JSON row \(.*\); fix or remove"):
            completed_units(rows_file)
        assert rows_file.read_text() == text


def test_method_against_method_pairs_the_two_columns(tmp_path, config):
    from fedcontrast.bench.report import comparison_cells, normalise_rows

    # fcl+decoder is fcl + 0.1 on seed 0 and fcl + 0.3 on seed 1, at every site
    rows = [
        fake_row(m, "local", 1, seed, site, base + (bonus if m == "fcl+decoder" else 0.0))
        for seed, bonus in ((0, 0.1), (1, 0.3))
        for site, base in zip(SITES, (0.2, 0.4))
        for m in ("random_init", "fcl", "fcl+decoder")
    ]
    cells = comparison_cells(normalise_rows(rows), ["random_init", "fcl", "fcl+decoder"], n_boot=200)
    assert set(cells) == {("fcl+decoder", "fcl", "local", "finetune", 1)}
    cell = cells["fcl+decoder", "fcl", "local", "finetune", 1]
    assert cell["mean"] == pytest.approx(0.2) and cell["n_pairs"] == 4 and cell["n_seeds"] == 2
    assert 0.1 - 1e-9 <= cell["ci_low"] <= cell["ci_high"] <= 0.3 + 1e-9
    config.methods = ["random_init", "fcl", "fcl+decoder"]
    report = write_report(rows, config, tmp_path, tmp_path / "report").read_text()
    assert "### fcl+decoder minus fcl: does decoder pre-training help FCL" in report


def test_results_file_has_every_results_format_key(tmp_path, config, rows):
    write_report(rows, config, tmp_path, tmp_path / "report")
    document = json.loads((tmp_path / "report" / "results.json").read_text())
    assert {"dataset", "config", "environment", "rows"} <= set(document)
    assert {"python", "torch", "monai", "nvflare", "cpu", "date"} <= set(document["environment"])
    for row in document["rows"]:
        assert set(row) == set(RESULT_KEYS)
        assert isinstance(row["dice"], dict) and set(row["dice"]) == {"RV", "MYO", "LV"}
        assert set(row["bytes_by_kind"]) == {
            f"{k}_{d}" for k in ("weights", "target", "features") for d in ("up", "down")
        }
        assert row["finetune"] in ("local", "federated") and math.isfinite(row["dice_mean"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "every unit of the grid completed" in report
    assert (tmp_path / "report" / "dice_vs_n.png").stat().st_size > 0


def test_tables_are_mean_and_std_across_seeds_of_the_site_means(rows):
    markdown = table(rows, "federated", ["fcl"], [1], lambda r: r["dice_mean"])
    # site-1: 0.65, site-2: 0.75, both seeds equal -> seed means 0.70, 0.70 -> 0.700 ± 0.000
    assert "| fcl | 0.700 ± 0.000 |" in markdown
    shifted = [dict(r, dice_mean=r["dice_mean"] + 0.1 * r["seed"]) for r in rows]
    # seed means 0.70 and 0.80: sample std 0.0707
    assert "| fcl | 0.750 ± 0.071 |" in table(shifted, "federated", ["fcl"], [1], lambda r: r["dice_mean"])


def test_ordering_sentences_are_computed_from_the_rows(rows):
    sentences = ordering_sentences(rows, [1], ["random_init", "fcl", "fedsimclr"])
    assert "federated fine-tuning, N=1: here fcl > random_init > fedsimclr; published fcl > random_init > " \
           "fedsimclr (the same ordering)." in sentences  # fmt: skip
    swapped = [dict(r, dice_mean=1 - r["dice_mean"]) for r in rows]
    assert any("a different ordering" in s for s in ordering_sentences(swapped, [1], ["random_init", "fcl"]))


def test_subset_reports_hold_only_their_methods_and_budgets(tmp_path, config, rows):
    write_fcl_vs_baselines(rows, config, tmp_path, tmp_path)
    subset = json.loads((tmp_path / "fcl_vs_baselines.json").read_text())["rows"]
    assert {r["method"] for r in subset} <= {"random_init", "local_cl", "fedsimclr", "fcl"}
    assert {r["n_labeled"] for r in subset} <= {1, 2}

    def record(target_up: int, server_metrics: list[dict]) -> dict:
        bytes_up = {"weights": 100, "target": target_up}
        per_round = [
            {"round": 0, "site": s, "bytes_up": bytes_up, "bytes_down": {"weights": 100}} for s in SITES
        ]
        return {"per_round": per_round, "server_metrics": server_metrics}

    sync = {
        "round": 0,
        "ema_factor": 0.9,
        "target_gap": 1e-4,
        "target_uploads": 1.0,
        "target_correction": 1.0,
    }
    records = {"fcl": record(0, []), "fedbyol": record(50, []), "fclopt_ptnu_dp": record(25, [sync])}
    for method, content in records.items():
        folder = tmp_path / "pretrain" / f"{method}_s0"
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps(content))
    report = write_communication(rows, config, tmp_path, tmp_path).read_text()
    document = json.loads(Path(tmp_path / "communication.json").read_text())
    assert document["total_bytes_per_site_per_round"] == {
        "fcl": 200.0,
        "fedbyol": 250.0,
        "fclopt_ptnu_dp": 225.0,
    }
    assert document["target_sync"] == {
        "fclopt_ptnu_dp": {
            "target_gap": 1e-4,
            "upload_share": 1 / len(SITES),
            "corrections": 1.0,
            "rounds": 1,
        }
    }
    assert "fclopt_ptnu_dp: 0.90x the bytes of federated BYOL and 1.12x those of FCL." in report
    assert "lies 1.00e-04 (relative L2" in report and "1 correction(s) sent" in report
    assert "fcl: 0.80x the bytes of federated BYOL" in report


def test_supervised_ceiling_pretrains_with_the_pretraining_volumes_labels(tmp_path, monkeypatch):
    """The ceiling column trains ``supervised`` on training + unlabelled volumes, labels attached."""
    seen = {}

    class StopRunError(Exception):
        pass

    def fake_run(method, config, entries, rounds, **kwargs):
        seen.update(method=method, config=config, entries=entries, rounds=rounds)
        raise StopRunError

    monkeypatch.setattr(protocol, "run_in_process", fake_run)
    datalist = {
        "site": "site-1",
        "training": [{"image": "a.nii.gz", "label": "a_gt.nii.gz", "patient": "p1"}],
        "unlabeled": [{"image": "b.nii.gz", "patient": "p2"}],
        "test": [{"image": "t.nii.gz", "label": "t_gt.nii.gz"}],
    }
    labels = {"a.nii.gz": "a_gt.nii.gz", "b.nii.gz": "b_gt.nii.gz", "t.nii.gz": "t_gt.nii.gz"}
    config = BenchConfig(pretrain_steps=8, pretrain_rounds=2, batch_size=4, finetune_batch_samples=8)
    with pytest.raises(StopRunError):
        protocol.pretrain_unit(config, protocol.SUPERVISED_CEILING, 3, {"site-1": datalist}, tmp_path, labels)
    assert seen["method"] == "supervised" and seen["rounds"] == 2
    labelled = [{"image": "a.nii.gz", "label": "a_gt.nii.gz"}, {"image": "b.nii.gz", "label": "b_gt.nii.gz"}]
    assert seen["entries"] == {"site-1": labelled}  # no test volume
    assert seen["config"]["local_steps"] == 4 and seen["config"]["batch_size"] == 4
    assert seen["config"]["bundle"]["samples_per_volume"] == 2 and seen["config"]["seed"] == 3
    with pytest.raises(ValueError, match=r"b\.nii\.gz"):
        protocol.ceiling_entries(datalist, {"a.nii.gz": "a_gt.nii.gz"})
    protocol.check_method(protocol.SUPERVISED_CEILING)  # a bench column, though not a registered method


def test_supervised_ceiling_refuses_an_unlabelled_pretraining_volume_before_any_work(tmp_path, monkeypatch):
    submitted = inline_pool(monkeypatch)
    datalist = {"site": "site-1", "training": [{"image": "a.nii.gz", "label": "a_gt.nii.gz"}]}
    datalist["unlabeled"] = [{"image": "b.nii.gz"}]
    monkeypatch.setattr(protocol, "prepare_splits", lambda config, out, *a: {1: {"site-1": datalist}})
    monkeypatch.setattr(protocol, "image_labels", lambda *a: {"a.nii.gz": "a_gt.nii.gz"})
    config = BenchConfig(budgets=[1], seeds=[0], methods=["random_init", protocol.SUPERVISED_CEILING])
    with pytest.raises(
        ValueError, match=r"site-1: supervised_ceiling needs every pre-training volume .* b\.nii\.gz"
    ):
        protocol.run_benchmark(config, tmp_path, workers=1)
    assert submitted == []


def test_the_target_method_is_read_as_a_share_of_the_supervised_ceiling():
    def summary(mean: float) -> dict:
        return {"mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01, "n_pairs": 20}

    differences = {
        ("local", "finetune", "fcl", 1): summary(0.02),
        ("local", "finetune", "supervised_ceiling", 1): summary(0.08),
        ("local", "finetune", "supervised_ceiling", 2): summary(0.05),  # not the target budget
        ("federated", "probe", "fcl", 1): summary(0.03),
        ("federated", "probe", "supervised_ceiling", 1): summary(-0.01),  # no gain: no share
        ("federated", "finetune", "supervised_ceiling", 1): summary(0.1),  # no FCL cell
    }
    shares = ceiling_share(differences)
    assert [(s["finetune"], s["readout"]) for s in shares] == [("federated", "probe"), ("local", "finetune")]
    assert shares[0]["share"] is None and shares[1]["share"] == pytest.approx(0.25)
    paragraph = ceiling_paragraph(shares)
    assert "FCL +0.020 [0.010, 0.030] of the ceiling's +0.080 [0.070, 0.090] (25%)" in paragraph
    assert "ceiling's -0.010 [-0.020, 0.000]; local" in paragraph  # no share without a gain
    assert ceiling_share({k: v for k, v in differences.items() if k[2] == "fcl"}) == []


def test_a_run_pretrained_from_an_encoder_file_does_not_meet_the_target():
    cell = {"mean": 0.1, "ci_low": 0.06, "ci_high": 0.14, "seed_ci_low": 0.06, "seed_ci_high": 0.14}
    cell.update(n_pairs=20, n_seeds=5)
    differences = {(mode, "finetune", "fcl", 1): cell for mode in ("local", "federated")}
    assert target_verdict(differences)["met"]
    verdict = target_verdict(differences, "ceiling_s{seed}.pt")
    assert not verdict["met"]
    line = verdict_line(verdict)
    assert "not applicable**" in line and "ceiling_s{seed}.pt" in line and "not from scratch" in line


def test_a_run_without_the_target_method_says_the_target_is_not_measured():
    cell = {"mean": 0.1, "ci_low": 0.06, "ci_high": 0.14, "seed_ci_low": 0.06, "seed_ci_high": 0.14}
    cell.update(n_pairs=20, n_seeds=5)
    differences = {(mode, "finetune", "fedmotion", 1): cell for mode in ("local", "federated")}
    verdict = target_verdict(differences)
    assert not verdict["met"] and not verdict["measured"]
    line = verdict_line(verdict)
    assert "fine-tuning: not measured by this run** (local: no paired rows; federated: no paired rows" in line
    assert "no fcl column paired with random init at N=1" in line
    one_mode = target_verdict({("federated", "finetune", "fcl", 1): cell})
    assert one_mode["measured"] and not one_mode["met"]
    assert "fine-tuning: not met** (local: no paired rows; federated: +0.100" in verdict_line(one_mode)


def test_quick_run_end_to_end_resumes_and_refuses_other_settings(tmp_path, capsys):
    """`fedcontrast bench --quick` for two methods: real pre-training, fine-tuning and scoring."""
    from fedcontrast.cli import main as fedcontrast_cli

    out = tmp_path / "run"
    argv = ["bench", "--quick", "--methods", "random_init", "fcl", "--budgets", "1", "2", "--out", str(out)]
    argv += ["--validation", "all"]  # every method scored on the validation patients too
    assert fedcontrast_cli(argv) == 0
    document = json.loads((out / "results.json").read_text())
    final = [r for r in document["rows"] if r["finetune_steps"] == 4 and r["eval_split"] == "test"]
    # methods x (local, federated, federated probe) x N = 1, 2 x sites (one seed)
    assert len(final) == 2 * 3 * 2 * 2
    # every checkpoint for random init and at N = 1 (curves); above it only the last one is scored
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    steps = {(r["method"], r["n_labeled"]): set() for r in rows}
    for r in rows:
        steps[r["method"], r["n_labeled"]].add(r["finetune_steps"])
    assert steps == {
        ("random_init", 1): {2, 4},
        ("random_init", 2): {2, 4},
        ("fcl", 1): {2, 4},
        ("fcl", 2): {4},
    }
    validation = {
        (r["method"], r["n_labeled"], r["finetune_steps"]) for r in rows if r["eval_split"] == "validation"
    }
    assert validation == {(m, n, s) for (m, n), scored in steps.items() for s in scored}
    assert len([r for r in rows if r["eval_split"] == "validation"]) == len(
        [r for r in rows if r["eval_split"] == "test"]
    )
    assert {r["readout"] for r in final} == {"finetune", "probe"}
    assert all(0.0 <= r["dice_mean"] <= 1.0 for r in document["rows"])
    # cross-site generalisation: each local full fine-tuning unit's site models, at the last
    # checkpoint, scored at every other site
    sites = sorted({r["site"] for r in final})
    cross = [r for r in document["rows"] if r["eval_split"] == "cross_site"]
    assert sorted((r["method"], r["n_labeled"], r["trained_site"], r["site"]) for r in cross) == sorted(
        (m, n, a, b) for m in ("random_init", "fcl") for n in (1, 2) for a in sites for b in sites if a != b
    )
    assert all(
        r["finetune"] == "local" and r["readout"] == "finetune" and r["finetune_steps"] == 4 for r in cross
    )
    assert "trained_site" not in final[0]
    fcl = [r for r in document["rows"] if r["method"] == "fcl"]
    assert all(r["pretrain_bytes_up"] > 0 and r["bytes_by_kind"]["features_up"] > 0 for r in fcl)
    report = (out / "report.md").read_text()
    assert "every unit of the grid completed" in report and "| fcl |" in report
    assert "## Cross-site generalisation, local fine-tuning (SPEC §7)" in report
    assert {c["method"] for c in document["summary"]["cross_site"]["paired_differences"]} == {"fcl"}
    assert all((out / f"{plot}.png").stat().st_size > 0 for plot in ("dice_vs_n", "bytes", "examples"))
    # the results say which defaults the methods ran with, as the run folder recorded them
    assert document["method_defaults"] == protocol.method_defaults(["fcl", "supervised"])

    rows_before = (out / "rows.jsonl").read_text()
    assert fedcontrast_cli(argv) == 0  # resumed: nothing left to do
    assert (out / "rows.jsonl").read_text() == rows_before
    capsys.readouterr()
    assert fedcontrast_cli([*argv, "--patients-per-site", "6"]) != 0
    assert "holds a run with other settings (patients_per_site)" in capsys.readouterr().err

    # a later call adds a seed: only its units run, the folder and its report hold both seeds
    assert fedcontrast_cli([*argv, "--seeds", "1"]) == 0
    assert (out / "rows.jsonl").read_text().startswith(rows_before)
    assert json.loads((out / "bench_config.json").read_text())["seeds"] == [0, 1]
    document = json.loads((out / "results.json").read_text())
    assert {r["seed"] for r in document["rows"]} == {0, 1}
    assert "seeds [0, 1]" in (out / "report.md").read_text()


@pytest.mark.parametrize("column", [protocol.SUPERVISED_CEILING, "supervised_ceiling_heart"])
def test_supervised_ceiling_end_to_end_hands_its_trained_encoder_to_fine_tuning(
    column, tmp_path, monkeypatch
):
    """The quick profile with a ceiling column, units in this process: real supervised
    pre-training on labelled pre-training volumes (for a variant, their copies with merged
    classes), an encoder that moved, rows like any column."""
    import nibabel as nib
    import numpy as np
    import torch

    from fedcontrast.methods import supervised
    from fedcontrast.methods.base import message_to_state_dict
    from fedcontrast.methods.volumes import pretraining_entries
    from fedcontrast.nets.bundle import encoder_state, read_encoder

    inline_pool(monkeypatch)
    loaded = []
    original = supervised.load_pretrained_encoder

    def spy(network, path, *args):
        loaded.append(str(path))
        return original(network, path, *args)

    monkeypatch.setattr(supervised, "load_pretrained_encoder", spy)
    config = BenchConfig(**{**PROFILES["quick"], "readouts": ["probe"]}, methods=["random_init", column])
    rows = protocol.run_benchmark(config, tmp_path, workers=1)
    folder = tmp_path / "pretrain" / f"{column}_s0"
    record = json.loads((folder / "record.json").read_text())
    assert all(site["bytes_by_kind"]["weights_up"] > 0 for site in record["sites"].values())
    merged = sorted((tmp_path / "ceiling_labels").glob("*/*.nii.gz"))
    if column == protocol.SUPERVISED_CEILING:
        assert merged == []  # the labels as they are
    else:  # every pre-training volume's label, the heart one class
        assert config.ceiling_config(0, column)["bundle"]["labels"] == {"background": 0, "RV+MYO+LV": 1}
        labels = protocol.image_labels(tmp_path / "data", "acdc", tmp_path / "frames")
        site_lists = protocol.prepare_splits(config, tmp_path)[1].values()
        volumes = sorted(e["image"] for d in site_lists for e in pretraining_entries(d))
        assert [p.name for p in merged] == [f"{i:04d}_{Path(labels[v]).name}" for i, v in enumerate(volumes)]
        for path, volume in zip(merged, volumes, strict=True):
            heart = np.asarray(nib.load(labels[volume]).dataobj) > 0
            assert np.array_equal(np.asarray(nib.load(path).dataobj), heart.astype(np.uint8))
    start = supervised.SupervisedBundleTrainer.initial_message(config.ceiling_config(0, column))
    initial = encoder_state(message_to_state_dict(start))
    trained = read_encoder(folder / "global.pt")[0]
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(initial[k], v) for k, v in trained.items() if v.is_floating_point())
    assert loaded == [str(folder / "global.pt")]  # the one probe unit of the column
    ceiling = [r for r in rows if r["method"] == column]
    assert {(r["finetune"], r["readout"]) for r in ceiling} == {("federated", "probe")}
    assert all(0.0 <= r["dice_mean"] <= 1.0 for r in ceiling)
