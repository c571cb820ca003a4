"""One column minus another across two run folders whose fine-tuning is the same (issue 10).

A run folder refuses other pre-training settings, so a column pre-trained differently (e.g.
``--pretrain-overrides '{"initial_encoder": ...}'``) lives in its own folder. Where both
folders' random init rows are identical to the last digit (same machine, data, split, decoder
initialisation and fine-tuning), a column of one folder and a column of the other are paired
like two columns of one folder: per (mode, readout, N), the mean of ``A minus B`` over the
(seed, site) pairs with the report's 95% bootstrap intervals
(:func:`fedcontrast.bench.stats.summarise`).

    python benchmarks/column_difference.py RUN_A/results.json fcl RUN_B/results.json supervised_ceiling \
        --out benchmarks/results/label_efficiency_ablations/fcl_from_ceiling/fcl_minus_ceiling

With ``--split validation`` the pairs are the validation patients' rows, read from the run
folders' ``rows.jsonl`` (``results.json`` keeps random init's validation rows only; the runs must
have been made with ``--validation all``).

``--also RUN_A METHOD_A RUN_B METHOD_B`` (repeatable) adds the two columns on another phantom and
split (runs that differ from the first pair in ``--data-seed`` too; a column may be named
otherwise there) and pools the pairs: a pair's seed becomes ``d<data seed>/s<run seed>``, each
(data seed, run seed) its own unit, as in :mod:`pooled_difference`:

    python benchmarks/column_difference.py D0_A fcl D0_B fedmotion --also D1_A fcl D1_B fedmotion \
        --split validation --out benchmarks/results/label_efficiency_ablations/fcl_after_motion/pooled

``--gains`` compares what the two columns gain instead: each column minus random init of its own
run, then A minus B, per (seed, site) pair. It is for runs on the same patients, splits and seeds
whose random init differs because the data does (e.g. two phantom difficulties that draw the same
patients, with ``--free difficulty methods``): does a method gain more on one than on the other?

    python benchmarks/column_difference.py ANATOMY fcl PLANNED fcl --gains --free difficulty methods \
        --out benchmarks/results/label_efficiency_ablations/anatomy/gain_anatomy_minus_planned

Runs that differ in how the columns are fine-tuned (a setting of :data:`FINE_TUNING`, freed with
``--free``) pair a column fine-tuned one way with a column fine-tuned another, on the same patients,
splits, seeds and decoder initialisation; random init's rows then differ by design and are not
compared. It answers "does a pre-trained encoder fine-tuned its own way beat random init fine-tuned
its way?":

    python benchmarks/column_difference.py SCALED fedmotion BASELINE random_init \
        --free methods seeds readouts finetune_encoder_lr_scale --split validation --out ...

Writes ``<out>.json`` and ``<out>.md``. Refuses runs whose settings differ in anything but the
pre-training (``--free``), or whose random init rows differ (without ``--gains`` and with the same
fine-tuning), and pooled pairs that share a data seed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_per_site import check_comparable, load_run
from pooled_difference import pooled_seed, replication_seeds

from fedcontrast.bench.protocol import with_defaults
from fedcontrast.bench.report import format_difference, headline_rows, merge_runs, normalise_rows, output_file
from fedcontrast.bench.stats import PAIR_KEYS, paired_differences, summarise

#: Settings the two runs may differ in: how the columns were pre-trained, and which cells ran.
FREE = ("methods", "seeds", "budgets", "pretrain_overrides", "pretrain_steps", "pretrain_rounds", "cine")
CELL = ("finetune", "readout", "n_labeled")
#: Settings of how a column is fine-tuned: runs that differ in one pair columns fine-tuned differently.
FINE_TUNING = ("finetune_lr", "finetune_encoder_lr_scale", "finetune_encoder_warmup_steps")


def final_rows(run: dict[str, Any], method: str, split: str = "test") -> list[dict[str, Any]]:
    """The run's final-checkpoint rows of ``method`` on ``split``."""
    return [r for r in headline_rows(normalise_rows(run["rows"]), split) if r["method"] == method]


def load_folder(folder: Path) -> dict[str, Any]:
    """A run folder's settings and all its rows (:func:`~fedcontrast.bench.report.merge_runs`)."""
    if not (folder / "bench_config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a bench run folder (no bench_config.json)")
    config, rows, _ = merge_runs([folder])
    return {"config": config, "rows": rows}


def check_same_random_init(a: dict[str, Any], b: dict[str, Any], split: str = "test") -> int:
    """Number of random init rows on ``split`` both runs hold; refuses any that differ (the pairing
    would not hold)."""
    rows_a = {tuple(r[k] for k in PAIR_KEYS): r["dice_mean"] for r in final_rows(a, "random_init", split)}
    rows_b = {tuple(r[k] for k in PAIR_KEYS): r["dice_mean"] for r in final_rows(b, "random_init", split)}
    common = set(rows_a) & set(rows_b)
    differ = [k for k in common if rows_a[k] != rows_b[k]]
    if not common or differ:
        raise ValueError(
            f"random init's rows differ in {len(differ)} of {len(common)} common rows: the runs' "
            "fine-tuning is not the same, so their columns cannot be paired"
        )
    return len(common)


def fine_tuning_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The :data:`FINE_TUNING` settings in which two runs differ (a setting missing from a run's
    configuration counts as its default)."""
    first, second = with_defaults(a["config"]), with_defaults(b["config"])
    return [k for k in FINE_TUNING if first.get(k) != second.get(k)]


def gain_rows(run: dict[str, Any], method: str, split: str = "test") -> list[dict[str, Any]]:
    """The run's final-checkpoint rows of ``method`` on ``split``, each scored as its Dice minus
    that of the run's random init row of the same (seed, site, cell)."""
    rows = final_rows(run, method, split) + final_rows(run, "random_init", split)
    pairs = paired_differences(rows, method)
    return [{**pair, "method": method, "dice_mean": pair["difference"]} for pair in pairs]


def column_difference(
    runs: Sequence[tuple[dict[str, Any], str, dict[str, Any], str]], split: str = "test", gains: bool = False
) -> list[dict]:
    """Per (mode, readout, N) the runs hold on ``split``: :func:`summarise` of column A minus column
    B, pooled over ``runs``' ``(run_a, method_a, run_b, method_b)`` (one per data seed; a seed is
    ``d<data seed>/s<run seed>`` when there are several). With ``gains``, each column is first
    scored against its own run's random init (:func:`gain_rows`).

    Raises:
        ValueError: a run lacks its column's rows on ``split`` (the run's data seed named).
    """
    rows, pooled = [], len(runs) > 1
    column_rows = gain_rows if gains else final_rows
    for run_a, method_a, run_b, method_b in runs:
        data_seed = run_a["config"].get("data_seed", 0)
        for run, method, tag in ((run_a, method_a, "A"), (run_b, method_b, "B")):
            found = column_rows(run, method, split)
            if not found:
                raise ValueError(f"data seed {data_seed}: no {split} rows of {method} in its run {tag}")
            rows += [
                {**r, "method": tag, "seed": pooled_seed(data_seed, r["seed"]) if pooled else r["seed"]}
                for r in found
            ]
    pairs = paired_differences(rows, "A", "B")
    cells = sorted({tuple(p[k] for k in CELL) for p in pairs})
    return [
        {**dict(zip(CELL, cell)), **summarise([p for p in pairs if tuple(p[k] for k in CELL) == cell])}
        for cell in cells
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("method_a")
    parser.add_argument("run_b", type=Path)
    parser.add_argument("method_b")
    parser.add_argument(
        "--also",
        nargs=4,
        action="append",
        default=[],
        metavar=("RUN_A", "METHOD_A", "RUN_B", "METHOD_B"),
        help="the two columns on another data seed, pooled",
    )
    parser.add_argument("--free", nargs="*", default=list(FREE), help="settings the runs may differ in")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="validation: RUN_A and RUN_B are run folders",
    )
    parser.add_argument(
        "--gains", action="store_true", help="compare each column's gain over its own run's random init"
    )
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    load = load_folder if args.split == "validation" else load_run
    columns = [(args.run_a, args.method_a, args.run_b, args.method_b)]
    columns += [(Path(a), method_a, Path(b), method_b) for a, method_a, b, method_b in args.also]
    runs = [(load(a), method_a, load(b), method_b) for a, method_a, b, method_b in columns]
    for (path_a, _, path_b, _), (a, _, b, _) in zip(columns, runs, strict=True):
        check_comparable({path_a: a, path_b: b}, tuple(args.free))
    check_comparable({c[0]: r[0] for c, r in zip(columns, runs, strict=True)}, (*args.free, "data_seed"))
    data_seeds = replication_seeds([a["config"] for a, *_ in runs], "pooled pairs")
    recipes = sorted({k for a, _, b, _ in runs for k in fine_tuning_differences(a, b)})
    same_fine_tuning = not (args.gains or recipes)
    shared = sum(check_same_random_init(a, b, args.split) for a, _, b, _ in runs) if same_fine_tuning else 0
    cells = column_difference(runs, args.split, args.gains)
    if not cells:
        raise ValueError(f"no (seed, site) pairs of {args.method_a} and {args.method_b}")
    document = {
        "benchmark": "column_difference",
        "command": "python " + shlex.join(sys.argv),
        "a": {"run": str(args.run_a), "method": args.method_a},
        "b": {"run": str(args.run_b), "method": args.method_b},
        "also": [
            {"a": {"run": a, "method": ma}, "b": {"run": b, "method": mb}} for a, ma, b, mb in args.also
        ],
        "data_seeds": data_seeds,
        "split": args.split,
        "gains": args.gains,
        "fine_tuning_differs_in": recipes,
        "identical_random_init_rows": shared,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(document, indent=1))
    if args.gains:
        pairing = (
            "Each column is scored minus its own run's random init on the same (seed, site), and the two "
            "gains are paired (95% bootstrap over seeds x sites)."
        )
    elif recipes:
        pairing = (
            f"The runs fine-tune differently ({', '.join(recipes)}), so the columns are paired on the same "
            "(seed, site) of the same patients and splits (95% bootstrap over seeds x sites)."
        )
    else:
        pairing = (
            f"Random init's {shared} final {args.split} rows are identical in both runs, so the columns "
            "pair like two columns of one run (95% bootstrap over seeds x sites)."
        )
    gain = " gain over random init" if args.gains else ""
    lines = [
        f"# {args.method_a}{gain} (`{args.run_a}`) minus {args.method_b}{gain} (`{args.run_b}`)"
        + (f", pooled over data seeds {data_seeds}" if args.also else "")
        + "\n",
        f"Written by `{document['command']}`. {pairing}\n",
        "| mode | readout | N | difference | (seed, site) pairs |",
        "|---|---|---|---|---|",
        *(
            f"| {c['finetune']} | {c['readout']} | {c['n_labeled']} | {format_difference(c)} "
            f"| {c['n_pairs']} |"
            for c in cells
        ),
    ]
    output_file(args.out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
