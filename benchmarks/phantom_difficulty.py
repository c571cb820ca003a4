"""How hard is the phantom? Random init's converged label-efficiency curve, and an intensity oracle.

The label-efficiency benchmark can only show what pre-training adds if one labelled volume
per site does not already describe the whole population. This script calibrates that: on a
phantom of a given :class:`~fedcontrast.data.phantom.Difficulty` it fine-tunes a randomly
initialised bundle network federated (FedAvg over 4 sites, through
:func:`~fedcontrast.methods.runner.run_in_process` with the ``supervised`` method, as
``fedcontrast bench`` does) on N labelled volumes per site, for the same number of
optimiser steps at every N, and scores the global model on held-out **validation** patients
of every site after every round (:class:`~fedcontrast.bench.evaluate.BundleScorer`). The
curve of mean Dice against steps shows where random init plateaus; the plateau per N is
compared with the published federated random-init curve (SPEC §7: N=1 0.445, N=2 0.572,
N=4 0.764, N=8 0.834).

Steps: the bundle draws one patch per volume and epoch (3D), so a site does
ceil(N / batch_size) optimiser steps an epoch; every round runs ``steps_per_round`` steps
(``steps_per_round / ceil(N / batch_size)`` epochs), the same for every N.

Also reported per candidate (context, cheap): the oracle intensity-interval Dice, the best
Dice any per-volume intensity interval reaches against the ground truth (exact, by
Dinkelbach iterations), on the whole image and inside a box around the heart.

Each run appends its candidate (settings, curves, command) to the results file; ``--choose``
marks the candidate named ``--name`` as the chosen calibration.

Usage::

    nice -n 15 .venv/bin/python benchmarks/phantom_difficulty.py --name realistic \\
        --difficulty realistic --seeds 0 1 --budgets 1 8 --steps 160 --choose
    # random init's curves of a `fedcontrast bench` run folder (its validation rows) as a candidate:
    .venv/bin/python benchmarks/phantom_difficulty.py --name bench-384 --from-bench workspace/le-long
    # a variant of a named difficulty, for calibration:
    nice -n 15 .venv/bin/python benchmarks/phantom_difficulty.py --name wider-pose \\
        --difficulty realistic --set heart_rotation_deg=90 --set heart_shift_mm=30
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from fedcontrast.bench.environment import environment
from fedcontrast.data.io import write_json
from fedcontrast.data.phantom import LABELS, Difficulty, get_difficulty, synthesize_dataset
from fedcontrast.nets.presets import network_preset

FOREGROUND = {name: value for name, value in LABELS.items() if value}
BOX_MARGIN_MM = 20.0
#: Published federated fine-tuning curve of random init (SPEC §7), mean Dice by N.
PUBLISHED = {1: 0.445, 2: 0.572, 4: 0.764, 8: 0.834}
#: The benchmark's network and geometry at size "small" (``BenchConfig.network``).
NETWORK: dict[str, Any] = network_preset("small")
RESULTS = Path(__file__).parent / "results" / "phantom_difficulty.json"
#: The data settings of a bench run's configuration that a calibration candidate records.
DATA_KEYS = ("size", "sites", "patients_per_site", "validation_per_site", "test_per_site", "data_seed")


def best_interval_dice(image: np.ndarray, target: np.ndarray) -> float:
    """Highest Dice between ``target`` (bool) and ``lo <= image <= hi`` over all intervals [lo, hi].

    Args:
        image: intensities, any shape.
        target: boolean mask of the same shape.

    Returns:
        The optimal Dice in [0, 1] (0 when ``target`` is empty).
    """
    _, inverse = np.unique(image, return_inverse=True)
    n = np.bincount(inverse.ravel()).astype(float)
    c = np.bincount(inverse.ravel(), weights=target.ravel().astype(float), minlength=len(n))
    g = c.sum()
    if g == 0:
        return 0.0
    ratio = 0.0
    while True:
        s = np.concatenate([[0.0], np.cumsum(2 * c - ratio * n)])
        lowest_before = np.minimum.accumulate(s[:-1])
        j = int(np.argmax(s[1:] - lowest_before))
        i = int(np.argmin(s[: j + 1]))
        dice = 2 * c[i : j + 1].sum() / (g + n[i : j + 1].sum())
        if dice <= ratio + 1e-12:
            return float(ratio)
        ratio = dice


def heart_box(label: np.ndarray, spacing: list[float]) -> tuple[slice, ...]:
    """In-plane bounding box of the labelled voxels dilated by :data:`BOX_MARGIN_MM`, all slices."""
    xs, ys = np.nonzero(label.any(axis=2))
    mx, my = (int(np.ceil(BOX_MARGIN_MM / s)) for s in spacing[:2])
    return (
        slice(max(xs.min() - mx, 0), xs.max() + mx + 1),
        slice(max(ys.min() - my, 0), ys.max() + my + 1),
        slice(None),
    )


def score(entry: dict) -> dict:
    """Oracle Dice per class for one datalist entry, on the whole image and inside the heart box."""
    image = np.asarray(nib.load(entry["image"]).dataobj)
    label = np.asarray(nib.load(entry["label"]).dataobj)
    box = heart_box(label, entry["spacing"])
    whole = {name: best_interval_dice(image, label == value) for name, value in FOREGROUND.items()}
    cropped = {
        name: best_interval_dice(image[box], label[box] == value) for name, value in FOREGROUND.items()
    }
    return {
        "method": "intensity_interval_oracle",
        "site": entry.get("site"),
        "patient": entry["patient"],
        "frame": entry["frame"],
        "dice": {k: round(v, 4) for k, v in whole.items()},
        "dice_mean": round(float(np.mean(list(whole.values()))), 4),
        "heart_box_dice": {k: round(v, 4) for k, v in cropped.items()},
    }


def summarise(rows: list[dict], key: str) -> dict:
    """Mean (and std across volumes) of a per-class Dice field over ``rows``."""
    per_class = {name: [row[key][name] for row in rows] for name in FOREGROUND}
    means = [np.mean(list(row[key].values())) for row in rows]
    return {
        "dice_mean": round(float(np.mean(means)), 4),
        "dice_mean_std": round(float(np.std(means)), 4),
        "dice": {name: round(float(np.mean(v)), 4) for name, v in per_class.items()},
    }


def make_splits(
    root: Path,
    difficulty: Difficulty,
    sites: int,
    patients_per_site: int,
    val_per_site: int,
    data_seed: int,
    budgets: list[int],
    size: str,
) -> tuple[dict[int, dict[str, dict]], dict[str, Any]]:
    """Generate the phantom and split it per budget: ``{N: {site: datalist}}``, plus its summary.

    The datalists' ``test`` part holds the held-out validation patients (the same for every N).
    """
    from fedcontrast.data.datalist import load_site_datalist
    from fedcontrast.data.readers import read_dataset
    from fedcontrast.data.splits import write_site_splits

    summary = synthesize_dataset(
        root / "data", sites, patients_per_site, data_seed, size, difficulty=difficulty
    )
    entries, labels = read_dataset(root / "data", "acdc")
    splits = {}
    for n in budgets:
        folder = root / "splits" / f"N{n}"
        write_site_splits(entries, labels, folder, n, val_per_site, seed=data_seed)
        splits[n] = {p.stem: load_site_datalist(p) for p in sorted(folder.glob("site-*.json"))}
    return splits, summary


def fedavg_curve(
    splits: dict[str, dict], scorer: Any, n: int, seed: int, steps: int, steps_per_round: int, batch_size: int
) -> list[dict[str, Any]]:
    """Federated fine-tuning of random init on ``n`` volumes per site; validation Dice after every round.

    Returns:
        One dict per round: ``steps`` (optimiser steps per site so far), ``dice_mean`` (mean over
        sites of each site's validation mean Dice), ``sites`` ({site: dice_mean}).
    """
    from fedcontrast.methods.base import message_to_state_dict
    from fedcontrast.methods.runner import run_in_process

    per_epoch = math.ceil(n / batch_size)  # one patch per volume and epoch (3D)
    if steps_per_round % per_epoch or steps % steps_per_round:
        raise ValueError(
            f"steps_per_round {steps_per_round} must be a multiple of {per_epoch} (N={n}, batch "
            f"{batch_size}) and divide steps {steps}"
        )
    config = {
        "bundle": NETWORK,
        "pretrained_encoder": "",
        "local_epochs": steps_per_round // per_epoch,
        "batch_size": batch_size,
        "seed": seed,
        "num_workers": 0,
    }
    training = {site: s["training"] for site, s in splits.items()}
    curve: list[dict[str, Any]] = []

    def on_round(round_num: int, updates: dict, global_message: dict) -> None:
        done = {u.metrics["steps"] for u in updates.values()}
        if done != {float(steps_per_round)}:
            raise RuntimeError(f"N={n}: sites ran {done} steps in a round, expected {steps_per_round}")
        state = message_to_state_dict(global_message)
        sites = {site: scorer.score(state, site)["dice_mean"] for site in training}
        curve.append(
            {
                "steps": (round_num + 1) * steps_per_round,
                "dice_mean": round(float(np.mean(list(sites.values()))), 4),
                "sites": {k: round(v, 4) for k, v in sites.items()},
            }
        )
        print(f"  N={n} seed={seed} steps={curve[-1]['steps']} dice={curve[-1]['dice_mean']}", flush=True)

    run_in_process("supervised", config, training, steps // steps_per_round, on_round=on_round)
    return curve


def _unit(work: tuple) -> list[dict[str, Any]]:
    """One (N, seed) curve in this process: builds its own scorer on the validation patients."""
    from fedcontrast.bench.evaluate import BundleScorer

    torch.set_num_threads(1)
    splits = work[0]
    scorer = BundleScorer({site: s["test"] for site, s in splits.items()}, NETWORK)
    return fedavg_curve(splits, scorer, *work[1:])


def plateau(curve: list[dict[str, Any]], last: int) -> float:
    """Mean validation Dice over the ``last`` evaluations of a curve."""
    return float(np.mean([point["dice_mean"] for point in curve[-last:]]))


def parse_settings(base: str, settings: list[str]) -> Difficulty:
    """``base`` difficulty with ``field=value`` overrides (values as Python literals)."""
    level = get_difficulty(base)
    changes = {}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Difficulty)}:
            raise SystemExit(f"--set {item}: {key!r} is not a Difficulty field")
        changes[key] = ast.literal_eval(value)
    return dataclasses.replace(level, **changes)


def plateau_check(mean_curves: dict[str, list[dict[str, Any]]], window: int = 2, rise: float = 0.02) -> dict:
    """Per N: the seed-mean Dice of the last ``window`` evaluations against the ``window`` before.

    ``reached`` is False when the last window is more than ``rise`` above the one before (still
    climbing: the measured "plateau" is then a lower bound of random init's converged Dice).
    """
    checks = {}
    for n, curve in mean_curves.items():
        values = [p["dice_mean"] for p in curve]
        last, before = np.mean(values[-window:]), np.mean(values[-2 * window : -window] or values[:1])
        checks[n] = {
            "last_steps": curve[-1]["steps"],
            "last_window": round(float(last), 4),
            "window_before": round(float(before), 4),
            "reached": bool(last - before <= rise),
        }
    return checks


def bench_candidate(name: str, run: Path, plateau_last: int, command: str) -> dict[str, Any]:
    """A candidate from a ``fedcontrast bench`` run folder: random init's federated fine-tuning
    curves on the validation patients (mean over sites at each checkpoint, per N and seed).

    Raises:
        SystemExit: ``run`` holds no federated random-init validation rows.
    """
    config = json.loads((run / "bench_config.json").read_text())
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for line in (run / "rows.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if (
            row
            and row["method"] == "random_init"
            and row["finetune"] == "federated"
            and row["readout"] == "finetune"
            and row["eval_split"] == "validation"
        ):
            by_step = curves.setdefault(str(row["n_labeled"]), {}).setdefault(str(row["seed"]), {})
            by_step.setdefault(row["finetune_steps"], []).append(row["dice_mean"])
    if not curves:
        raise SystemExit(f"--from-bench {run}: no federated random-init validation rows")
    as_points = {
        n: {
            seed: [{"steps": s, "dice_mean": round(float(np.mean(v)), 4)} for s, v in sorted(by_step.items())]
            for seed, by_step in by_seed.items()
        }
        for n, by_seed in sorted(curves.items(), key=lambda kv: int(kv[0]))
    }
    return {
        "name": name,
        "command": command,
        "difficulty_base": config["difficulty"],
        "difficulty": dataclasses.asdict(get_difficulty(config["difficulty"])),
        "data": {k: config[k] for k in DATA_KEYS},
        "finetune": {
            "method": "fedcontrast bench: random init, federated fine-tuning (FedAvg over all sites)",
            "network": config["bundle"],
            "batch_samples": config["finetune_batch_samples"],
            "steps": config["finetune_steps"],
            "steps_per_round": config["finetune_steps"] // config["finetune_checkpoints"],
            "seeds": sorted({int(seed) for by_seed in as_points.values() for seed in by_seed}),
            "budgets": [int(n) for n in as_points],
            "scored_on": "held-out validation patients of every site, global model (the bench's scorer)",
            "plateau": f"mean validation Dice of the last {plateau_last} checkpoints",
        },
        **curve_summary(as_points, plateau_last),
        "environment": environment(),
    }


def seed_mean(by_seed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The curve averaged over seeds, checkpoint by checkpoint."""
    return [
        {"steps": pts[0]["steps"], "dice_mean": round(float(np.mean([p["dice_mean"] for p in pts])), 4)}
        for pts in zip(*by_seed.values())
    ]


def curve_summary(curves: dict[str, dict[str, list[dict[str, Any]]]], plateau_last: int) -> dict[str, Any]:
    """``plateau`` per N (mean over seeds, per seed, published), the seed-mean curve and ``curves``."""
    return {
        "plateau": {
            n: {
                "mean": round(float(np.mean([plateau(c, plateau_last) for c in by_seed.values()])), 4),
                "per_seed": {s: round(plateau(c, plateau_last), 4) for s, c in by_seed.items()},
                "published": PUBLISHED.get(int(n)),
            }
            for n, by_seed in curves.items()
        },
        "curve_mean_over_seeds": {n: seed_mean(by_seed) for n, by_seed in curves.items()},
        "curves": curves,
    }


def record(out: Path, candidates: list[dict[str, Any]], chosen: str | None = None) -> dict[str, Any]:
    """Add ``candidates`` to the results file ``out`` (replacing same-named ones); mark ``chosen``."""
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("benchmark") != "phantom_difficulty_calibration":
        result = {
            "benchmark": "phantom_difficulty_calibration",
            "description": __doc__.split("Usage::")[0].strip(),
            "published_random_init_federated": {str(k): v for k, v in PUBLISHED.items()},
            "candidates": [],
            "chosen": None,
        }
    for candidate in candidates:
        candidate["plateau_check"] = plateau_check(candidate["curve_mean_over_seeds"])
    names = {c["name"] for c in candidates}
    result["candidates"] = [c for c in result["candidates"] if c["name"] not in names] + candidates
    if chosen is not None:
        if chosen not in {c["name"] for c in result["candidates"]}:
            raise SystemExit(f"--choose: no candidate named {chosen!r} in {out}")
        result["chosen"] = chosen
    write_json(out, result)
    return result


def report_plateaus(name: str, plateaus: dict[str, dict[str, Any]]) -> None:
    """Print each N's plateau against the published value."""
    for n, p in plateaus.items():
        print(f"{name}: N={n} plateau {p['mean']} (seeds {p['per_seed']}; published {p['published']})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", help="candidate name in the results file (required unless --merge)")
    parser.add_argument("--difficulty", default="realistic", help="named difficulty to start from")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients-per-site", type=int, default=6)
    parser.add_argument("--val-per-site", type=int, default=2, help="held-out validation patients per site")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=160, help="optimiser steps per site, every N")
    parser.add_argument("--steps-per-round", type=int, default=20, help="steps between FedAvg rounds")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--plateau-last", type=int, default=2, help="evaluations averaged as the plateau")
    parser.add_argument("--jobs", type=int, default=1, help="(N, seed) units run in parallel processes")
    parser.add_argument("--choose", action="store_true", help="mark this candidate as the chosen one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="only add the candidates of these results files (runs written elsewhere) to --out",
    )
    parser.add_argument(
        "--from-bench",
        type=Path,
        help="record random init's federated validation curves of this `fedcontrast bench` run folder",
    )
    args = parser.parse_args(argv)
    command = "nice -n 15 .venv/bin/python benchmarks/phantom_difficulty.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.from_bench:
        if not args.name:
            parser.error("--name is required")
        candidate = bench_candidate(args.name, args.from_bench, args.plateau_last, command)
        report_plateaus(args.name, candidate["plateau"])
        return record(args.out, [candidate], args.name if args.choose else None)
    if args.merge:
        candidates = [c for f in args.merge for c in json.loads(f.read_text())["candidates"]]
        return record(args.out, candidates, args.name if args.choose else None)

    if not args.name:
        parser.error("--name is required")
    torch.set_num_threads(1)
    level = parse_settings(args.difficulty, args.set)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="phantom_difficulty_") as tmp:
        splits, summary = make_splits(
            Path(tmp),
            level,
            args.sites,
            args.patients_per_site,
            args.val_per_site,
            args.data_seed,
            args.budgets,
            args.size,
        )
        generated = time.perf_counter() - start
        first = splits[args.budgets[0]]
        validation = [e for s in first.values() for e in s["test"]]
        oracle = [score(e) for e in validation]
        units = [(n, seed) for n in args.budgets for seed in args.seeds]
        work = [(splits[n], n, seed, args.steps, args.steps_per_round, args.batch_size) for n, seed in units]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
                done = list(pool.map(_unit, work))
        else:
            done = [_unit(w) for w in work]
        curves: dict[str, dict[str, list]] = {}
        for (n, seed), curve in zip(units, done):
            curves.setdefault(str(n), {})[str(seed)] = curve
    candidate = {
        "name": args.name,
        "command": command,
        "difficulty_base": args.difficulty,
        "difficulty": dataclasses.asdict(level),
        "data": {
            "size": args.size,
            "sites": args.sites,
            "patients_per_site": args.patients_per_site,
            "validation_patients_per_site": args.val_per_site,
            "data_seed": args.data_seed,
            "site_protocols": {
                name: {k: v for k, v in s.items() if k != "patients"} for name, s in summary["sites"].items()
            },
        },
        "finetune": {
            "method": "supervised (random init), FedAvg over all sites, run_in_process",
            "network": NETWORK,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "steps_per_round": args.steps_per_round,
            "seeds": args.seeds,
            "budgets": args.budgets,
            "scored_on": "held-out validation patients of every site (ED and ES), global model, BundleScorer",
            "plateau": f"mean validation Dice of the last {args.plateau_last} evaluations",
        },
        **curve_summary(curves, args.plateau_last),
        "intensity_oracle_validation": {
            "whole_image": summarise(oracle, "dice"),
            "heart_box": summarise(oracle, "heart_box_dice"),
        },
        "generate_s": round(generated, 2),
        "wall_s": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }
    result = record(args.out, [candidate], args.name if args.choose else None)
    report_plateaus(args.name, candidate["plateau"])
    print(
        f"oracle intensity Dice {candidate['intensity_oracle_validation']['whole_image']['dice_mean']}; "
        f"{candidate['wall_s']} s; written to {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
