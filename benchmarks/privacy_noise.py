"""What the feature privacy noise costs: FCL pre-trained with noised features, then fine-tuned.

FCL is pre-trained in process with the label-efficiency bench's data, network and budgets
(``BenchConfig`` of ``--profile``, ``cpu`` by default: 4 sites, 96 steps in 4 rounds) with
every site's uploaded feature rows clipped to L2 norm C (``--clip``) and noised with
``N(0, (Z C)^2)`` per value, for each noise multiplier Z (``--noise``): the transform of the
sites' NVFlare ``FeaturePrivacyFilter``, applied where that filter acts
(:func:`~fedcontrast.methods.runner.run_in_process`'s ``site_filter``, carried by the bench's
``pretrain_overrides`` keys ``feature_clip`` / ``feature_noise``; noise seeded by the run
seed). Each encoder is then fine-tuned with the bench's :func:`finetune_unit` (federated,
N = 1, the bench's fine-tuning budget) and scored on every site's test patients.

Reported per Z: the paired Dice difference (final checkpoint, test patients) against Z = 0
and against random init (same seed, site and split; 95% percentile bootstrap over the
(seed, site) pairs, :mod:`fedcontrast.bench.stats`), what pre-training itself shows (last
round's InfoNCE loss and partition nearest-mean accuracy on each site's probe set, from the
pre-training record's curve, also paired against Z = 0), and the per-row (ε, δ) of the
Gaussian mechanism (sensitivity 2C when a row is replaced, noise std Z C: μ = 2 / Z; exact
analytic bound of Balle & Wang 2018, :func:`~fedcontrast.methods.privacy.gaussian_epsilon`,
and the classic bound Δ sqrt(2 ln(1.25/δ)) / (Z C) where it applies, ε <= 1).

Random init's fine-tuning rows come from ``--random-init-from`` (a bench run folder) when its
``bench_config.json`` equals this run's configuration (methods aside) and its N = 1 split
holds the same patients; otherwise random init is fine-tuned here. Every finished unit is
saved in ``--workdir`` (``rows.jsonl``, ``pretrain/z<Z>_s<seed>/record.json``), so a stopped
run continues where it stopped; ``--report-only`` writes the results from what is there.
Units run in the order: Z levels as given, seeds within; fine-tuning before the next
pre-training; ``--wall-budget`` stops starting units after that many seconds.

    python benchmarks/privacy_noise.py --noise 0 2 1 0.5 4 --seeds 0 1 2 \\
        --random-init-from /work/wt-run/workspace/le-cpu2 --workdir workspace/privacy-noise \\
        --out benchmarks/results/privacy_noise
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any

from fedcontrast.bench.environment import environment
from fedcontrast.bench.protocol import (
    PROFILES,
    RANDOM_INIT,
    BenchConfig,
    FinetuneUnit,
    finetune_unit,
    load_rows,
    prepare_splits,
    pretrain_unit,
    run_unit,
    unit_pool,
)
from fedcontrast.bench.report import output_file
from fedcontrast.bench.stats import paired_differences, summarise, values_summary
from fedcontrast.methods.fcl import DEFAULTS as FCL_DEFAULTS
from fedcontrast.methods.privacy import gaussian_epsilon

METHOD = "fcl"
DELTA = 1e-5
MODE = "federated"
N_LABELED = 1


def label(noise: float) -> str:
    """The method label of FCL pre-trained with noise multiplier ``noise`` (``fcl Z=0.5``)."""
    return f"{METHOD} Z={noise:g}"


def bench_config(profile: str, seeds: list[int], clip: float, noise: float) -> BenchConfig:
    """The bench configuration of one noise level (``BenchConfig`` of ``profile``, FCL, N = 1).

    Z = 0 is the reference without any filter (FCL's rows are unit-norm: a clip at C >= 1 alone
    leaves them as they are), i.e. exactly the bench's FCL.
    """
    base = BenchConfig(**PROFILES[profile])
    overrides = {**base.pretrain_overrides, "feature_clip": clip, "feature_noise": noise} if noise else {}
    return dataclasses.replace(
        base,
        methods=[METHOD],
        budgets=[N_LABELED],
        seeds=seeds,
        readouts=["finetune"],
        pretrain_overrides=overrides,
    )


def split_patients(splits: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """site -> split name -> sorted patient ids (what a split is, whatever the folder)."""
    return {
        site: {
            part: sorted({e["patient"] for e in d.get(part, [])})
            for part in ("training", "unlabeled", "validation", "test")
        }
        for site, d in splits.items()
    }


def reusable_rows(
    source: Path | None, config: BenchConfig, splits: dict[str, dict], method: str = RANDOM_INIT
) -> tuple[list[dict], str]:
    """``method``'s N = 1 federated fine-tuning rows of the bench run folder ``source`` for
    ``config.seeds`` (all of them, or none), and why (or why not)."""
    if source is None:
        return [], "no run folder given"
    saved = json.loads((source / "bench_config.json").read_text())
    ours = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(config, pretrain_overrides={}))))
    differ = sorted(
        k for k in ours if k not in ("methods", "budgets", "seeds", "readouts") and saved.get(k) != ours[k]
    )
    if differ:
        return [], f"{source}: other settings ({', '.join(differ)})"
    if not set(config.seeds) <= set(saved["seeds"]) or N_LABELED not in saved["budgets"]:
        return [], f"{source}: lacks seeds {config.seeds} or N = {N_LABELED}"
    theirs = {}
    for path in sorted((source / "splits" / f"N{N_LABELED}").glob("site-*.json")):
        theirs[path.stem] = json.loads(path.read_text())
    if split_patients(theirs) != split_patients(splits):
        return [], f"{source}: its N = {N_LABELED} split holds other patients"
    rows = [
        r
        for r in load_rows(source / "rows.jsonl")
        if r["method"] == method
        and r["finetune"] == MODE
        and r["n_labeled"] == N_LABELED
        and r["readout"] == "finetune"
        and r["seed"] in config.seeds
    ]
    units = {r["unit"] for r in rows}
    if len(units) != len(config.seeds):
        return [], f"{source}: {method} rows for {len(units)} of {len(config.seeds)} seeds"
    if method != RANDOM_INIT and not all(
        (source / "pretrain" / f"{method}_s{s}" / "record.json").exists() for s in config.seeds
    ):
        return [], f"{source}: lacks {method}'s pre-training records"
    return rows, f"taken from {source} (same settings and N = {N_LABELED} patients, checked)"


def run(args: argparse.Namespace) -> None:
    """Run (or continue) every unit in ``args.workdir`` within ``args.wall_budget`` seconds."""
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    configs = {z: bench_config(args.profile, args.seeds, args.clip, z) for z in args.noise}
    first = configs[args.noise[0]]
    splits = prepare_splits(first, work)[N_LABELED]
    rows_file = work / "rows.jsonl"
    done = {r["unit"] for r in load_rows(rows_file, repair=True)}
    reused, why = reusable_rows(args.reuse_from, first, splits)
    z0_rows, z0_why = reusable_rows(args.reuse_from, first, splits, METHOD) if 0.0 in args.noise else ([], "")
    source = {"random_init": why, "random_init_rows": len(reused), "z0": z0_why, "z0_rows": len(z0_rows)}
    (work / "reuse.json").write_text(json.dumps(source))
    print(f"random init: {why}\nZ = 0: {z0_why}", flush=True)

    def folder(z: float, seed: int) -> Path:
        return work / "pretrain" / f"z{z:g}_s{seed}"

    if z0_rows:  # the bench's own FCL (no filter) of the same settings: its records and rows
        for s in args.seeds:
            record = json.loads((args.reuse_from / "pretrain" / f"{METHOD}_s{s}" / "record.json").read_text())
            folder(0.0, s).mkdir(parents=True, exist_ok=True)
            target = folder(0.0, s) / "record.json"
            target.write_text(json.dumps({**record, "reused_from": str(args.reuse_from)}, indent=1))
        name = label(0.0)
        with open(rows_file, "a") as f:
            for row in z0_rows:
                if f"{name}|{row['seed']}" not in done:
                    f.write(
                        json.dumps({**row, "method": name, "unit": f"{name}|{row['seed']}", "noise": 0.0})
                        + "\n"
                    )
    queue: list[tuple[str, float | None, int]] = []
    if not reused:
        queue += [("finetune", None, s) for s in args.seeds if f"{RANDOM_INIT}|{s}" not in done]
    for index, z in enumerate(args.noise):
        for s in args.seeds:
            if not (folder(z, s) / "record.json").exists():
                queue.append(("pretrain", z, s))
            if f"{label(z)}|{s}" not in done and not (z == 0 and z0_rows):
                queue.append(("finetune", z, s))
        if index == 2 and z0_rows and not (work / "check" / f"z0_s{args.seeds[0]}" / "record.json").exists():
            # does pre-training here reproduce the reused Z = 0 encoder? (one seed)
            queue.append(("check", 0.0, args.seeds[0]))

    def ready(task: tuple[str, float | None, int]) -> bool:
        kind, z, s = task
        return kind != "finetune" or z is None or (folder(z, s) / "record.json").exists()

    start = time.perf_counter()
    with unit_pool(args.workers) as pool:
        running: dict[Any, tuple[str, float | None, int]] = {}
        while queue or running:
            elapsed = time.perf_counter() - start
            while len(running) < args.workers and elapsed < args.wall_budget:
                # a fine-tuning unit whose encoder is saved first, then the next pre-training
                task = next((t for t in queue if t[0] == "finetune" and ready(t)), None) or next(
                    (t for t in queue if t[0] != "finetune"), None
                )
                if task is None:
                    break
                queue.remove(task)
                kind, z, s = task
                if kind in ("pretrain", "check"):
                    out = folder(z, s) if kind == "pretrain" else work / "check" / f"z0_s{s}"
                    future = pool.submit(run_unit, pretrain_unit, configs[z], METHOD, s, splits, out)
                else:
                    config = first if z is None else configs[z]
                    unit = FinetuneUnit(RANDOM_INIT if z is None else METHOD, s, MODE, N_LABELED)
                    encoders = None if z is None else folder(z, s)
                    record = None if z is None else json.loads((encoders / "record.json").read_text())
                    future = pool.submit(
                        run_unit, finetune_unit, config, unit, splits, encoders, record, work / "examples"
                    )
                running[future] = task
            if not running:
                break
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                kind, z, s = running.pop(future)
                result = future.result()
                if kind == "finetune":
                    name = RANDOM_INIT if z is None else label(z)
                    with open(rows_file, "a") as f:
                        for row in result:
                            f.write(
                                json.dumps({**row, "method": name, "unit": f"{name}|{s}", "noise": z}) + "\n"
                            )
                print(f"{time.perf_counter() - start:7.0f} s  {kind} Z={z} seed {s} done", flush=True)
    if queue:
        print(f"wall budget reached: {len(queue)} units not run: {queue}", flush=True)


def reproduction(work: Path, seed: int) -> str:
    """Whether the check pre-training of Z = 0 here gave the reused record's curve exactly."""
    check, reused = (
        work / "check" / f"z0_s{seed}" / "record.json",
        work / "pretrain" / f"z0_s{seed}" / "record.json",
    )
    if not check.exists() or not reused.exists():
        return "not checked"
    keys = ("loss", "alignment", "uniformity", "partition_accuracy")
    ours, theirs = (json.loads(p.read_text())["curve"] for p in (check, reused))
    pairs = [(a.get(k), b.get(k)) for a, b in zip(ours, theirs) for k in keys]
    if len(ours) == len(theirs) and all(a == b for a, b in pairs):
        return f"seed {seed} re-run here: the same pre-training curve, bit for bit ({len(pairs)} values)"
    worst = max(abs(a - b) for a, b in pairs if a is not None and b is not None)
    return f"seed {seed} re-run here differs from the reused record (largest curve difference {worst:.3g})"


def final_rows(rows: list[dict], steps: int) -> list[dict]:
    """Rows of the final checkpoint on the test patients."""
    return [r for r in rows if r["finetune_steps"] == steps and r["eval_split"] == "test"]


def pretraining_pairs(records: dict[float, list[dict]], key: str) -> list[dict]:
    """One pseudo-row per (Z, seed, site): the last round's ``key`` of the pre-training curve."""
    out = []
    for z, recs in records.items():
        for rec in recs:
            last = max(e["round"] for e in rec["curve"])
            for e in rec["curve"]:
                if e["round"] == last and key in e:
                    out.append(
                        {
                            "method": label(z),
                            "seed": rec["seed"],
                            "site": e["site"],
                            "finetune": "-",
                            "n_labeled": 0,
                            "readout": "-",
                            "finetune_steps": 0,
                            "eval_split": "-",
                            "value": e[key],
                        }
                    )
    return out


def privacy_row(clip: float, noise: float, config: BenchConfig) -> dict[str, Any]:
    """(ε, δ) of one feature row at noise multiplier ``noise``, and what the noise does to a row."""
    sensitivity, sigma = 2 * clip, noise * clip
    classic = sensitivity * math.sqrt(2 * math.log(1.25 / DELTA)) / sigma if sigma else math.inf
    settings = {**FCL_DEFAULTS, **config.pretrain_overrides}
    dim, partitions, rounds = settings["embedding_dim"], settings["partitions"], config.pretrain_rounds
    return {
        "Z": noise,
        "sigma": sigma,
        "mu": sensitivity / sigma if sigma else math.inf,
        "epsilon_analytic": gaussian_epsilon(sensitivity, sigma, DELTA),
        "epsilon_classic": classic if sigma and classic <= 1 else None,
        # one volume's feature rows over the run (S a round, R rounds), Gaussian DP composition;
        # the weights leave unnoised, so this is no guarantee for the volume
        "epsilon_volume_features_only": gaussian_epsilon(
            sensitivity * math.sqrt(partitions * rounds), sigma, DELTA
        ),
        "expected_cosine_to_clean_row": 1 / math.sqrt(1 + dim * noise**2),
    }


def num(summary: dict[str, Any]) -> str:
    """The mean of a :func:`values_summary` (``n/a`` without values)."""
    return f"{summary['mean']:.3f}" if summary["n_pairs"] else "n/a"


def vs_z0(level: dict[str, Any], key: str) -> str:
    """The level's ``<key>_vs_z0`` formatted (``-`` for Z = 0 itself)."""
    pairs = level[f"{key}_vs_z0"]
    return fmt(pairs) if pairs else "-"


def fmt(s: dict[str, Any]) -> str:
    """``mean [low, high]`` of a :func:`summarise` result (``n/a`` without pairs)."""
    if not s["n_pairs"]:
        return "n/a"
    return f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Write ``args.out``.json and .md from the work folder; return the document."""
    work = args.workdir
    configs = {z: bench_config(args.profile, args.seeds, args.clip, z) for z in args.noise}
    config = configs[args.noise[0]]
    steps = config.finetune_steps
    rows = final_rows(load_rows(work / "rows.jsonl"), steps)
    source = json.loads((work / "reuse.json").read_text())
    if not any(r["method"] == RANDOM_INIT for r in rows) and args.reuse_from:
        splits = prepare_splits(config, work)[N_LABELED]
        rows += final_rows(reusable_rows(args.reuse_from, config, splits)[0], steps)
    rows = [r for r in rows if r["seed"] in args.seeds]
    records = {
        z: [
            json.loads((work / "pretrain" / f"z{z:g}_s{s}" / "record.json").read_text())
            for s in args.seeds
            if (work / "pretrain" / f"z{z:g}_s{s}" / "record.json").exists()
        ]
        for z in args.noise
    }
    pre = {k: pretraining_pairs(records, k) for k in ("loss", "partition_accuracy")}
    levels = []
    for z in args.noise:
        name = label(z)
        mine = [r for r in rows if r["method"] == name]
        level = {
            **privacy_row(args.clip, z, configs[z]),
            "seeds_pretrained": sorted(r["seed"] for r in records[z]),
            "seeds_finetuned": sorted({r["seed"] for r in mine}),
            "dice": values_summary(mine),
            "dice_vs_z0": summarise(paired_differences(rows, name, label(0.0))) if z else None,
            "dice_vs_random_init": summarise(paired_differences(rows, name, RANDOM_INIT)),
        }
        for key, pairs in pre.items():
            level[f"pretrain_{key}"] = values_summary(
                [p for p in pairs if p["method"] == name], lambda p: p["value"]
            )
            level[f"pretrain_{key}_vs_z0"] = (
                summarise(paired_differences(pairs, name, label(0.0), lambda p: p["value"])) if z else None
            )
        level["pretrain_final"] = [
            {"seed": p["seed"], "site": p["site"], key: p["value"]}
            for key, pairs in pre.items()
            for p in pairs
            if p["method"] == name
        ]
        level["pretrain_wall_s"] = [r["wall_s"] for r in records[z]]
        levels.append(level)
    random_init = values_summary([r for r in rows if r["method"] == RANDOM_INIT])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    document = {
        "benchmark": "privacy_noise",
        "profile": args.profile,
        "command": args.command,
        "commit": commit,
        "environment": environment(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "method": METHOD,
        "clip": args.clip,
        "delta": DELTA,
        "finetune": {"mode": MODE, "n_labeled": N_LABELED, "steps": steps, "eval_split": "test"},
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "random_init_source": source["random_init"],
        "z0_source": source["z0"] or "run here",
        "z0_reproduction": reproduction(work, args.seeds[0]),
        "random_init_dice": random_init,
        "notes": args.notes,
        "levels": levels,
        "rows": rows,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(document, indent=1))
    output_file(out, ".md").write_text(markdown(document))
    return document


def markdown(doc: dict[str, Any]) -> str:
    """The report's tables."""
    c = doc["clip"]
    lines = [
        f"# What the feature privacy noise costs (FCL, {doc['profile']} profile)",
        "",
        f"Written by `{doc['command']}` at commit {doc['commit']} on {doc['date_utc']}; "
        f"{doc['environment'].get('cpu')}, torch {doc['environment'].get('torch')}, CPU only.",
        "",
        f"FCL pre-trained with every uploaded feature row clipped to C = {c:g} and noised with "
        f"N(0, (Z C)^2) per value (the sites' `FeaturePrivacyFilter` transform), then fine-tuned "
        f"{doc['finetune']['mode']} on N = {doc['finetune']['n_labeled']} labelled volume per site for "
        f"{doc['finetune']['steps']} steps (the bench's `finetune_unit`); mean Dice on each site's test "
        "patients at the final checkpoint. Differences are paired on (seed, site); intervals are 95% "
        "percentile bootstraps over the (seed, site) pairs. Random init: " + doc["random_init_source"] + ". "
        f"Z = 0 (FCL without the filter): {doc['z0_source']}; {doc['z0_reproduction']}.",
        "",
        "| Z | seeds pre-trained / fine-tuned | Dice | Dice vs Z = 0 | Dice vs random init | final loss | "
        "loss vs Z = 0 | "
        "partition acc. | partition acc. vs Z = 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in doc["levels"]:
        lines.append(
            f"| {lv['Z']:g} | {len(lv['seeds_pretrained'])} / {len(lv['seeds_finetuned'])} | "
            f"{num(lv['dice'])} | "
            f"{vs_z0(lv, 'dice')} | {fmt(lv['dice_vs_random_init'])} | {num(lv['pretrain_loss'])} | "
            f"{vs_z0(lv, 'pretrain_loss')} | {num(lv['pretrain_partition_accuracy'])} | "
            f"{vs_z0(lv, 'pretrain_partition_accuracy')} |"
        )
    ri = doc["random_init_dice"]
    lines += ["", *([f"**Notes.** {doc['notes']}", ""] if doc["notes"] else [])]
    lines += [
        f"Random init's Dice on the same pairs: {ri['mean']:.3f} ({ri['n_pairs']} (seed, site) pairs).",
        "",
        f"## Privacy of one feature row (δ = {doc['delta']:g})",
        "",
        "Per released row: the Gaussian mechanism with L2 sensitivity 2C (one row replaced by another, "
        "both of norm <= C) and noise std Z C, so μ = 2 / Z. ε (analytic): the exact bound of the "
        "analytic Gaussian mechanism (Balle & Wang 2018); ε (classic): Δ sqrt(2 ln(1.25/δ)) / (Z C) "
        "(Dwork & Roth, Theorem A.1), only valid when it is <= 1. ε (one volume's features over the "
        "run): that volume's S = 4 rows a round over every round, composed as Gaussian DP "
        "(μ sqrt(S R)), assuming it is drawn every round; **the weights leave unnoised, so this is no "
        "guarantee for the volume**, only what the features alone would cost. cos: expected cosine "
        "between a noised unit-norm row and the clean one, 1 / sqrt(1 + D Z^2) with D = 128.",
        "",
        "| Z | μ | ε per row (analytic) | ε per row (classic) | ε one volume's features over the run | cos |",
        "|---|---|---|---|---|---|",
    ]
    for lv in doc["levels"]:
        classic = f"{lv['epsilon_classic']:.2f}" if lv["epsilon_classic"] is not None else "n/a (> 1)"
        classic = classic if lv["Z"] else "-"
        lines.append(
            f"| {lv['Z']:g} | {lv['mu']:.2f} | {lv['epsilon_analytic']:.2f} | {classic} | "
            f"{lv['epsilon_volume_features_only']:.2f} | {lv['expected_cosine_to_clean_row']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 2.0, 1.0, 0.5, 4.0])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--reuse-from",
        type=Path,
        default=None,
        help="bench run folder whose random init rows and FCL (= Z 0) records and rows are reused when "
        "its settings and split match",
    )
    parser.add_argument("--workdir", type=Path, default=Path("workspace/privacy-noise"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_noise"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--wall-budget", type=float, default=math.inf, help="seconds after which no unit starts"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--notes", default="", help="text for the report (how the run went)")
    args = parser.parse_args(argv)
    if 0.0 not in args.noise:
        parser.error("--noise must include 0 (the reference)")
    shown = [
        "'<the notes below>'" if i and sys.argv[i - 1] == "--notes" else shlex.quote(a)
        for i, a in enumerate(sys.argv)
    ]
    args.command = "python " + " ".join(shown)
    if not args.report_only:
        run(args)
    document = report(args)
    print(markdown(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
