"""A column minus random init pooled over bench runs on different phantoms and splits (issue 10).

One run's 20 (seed, site) pairs all come from one phantom and one split of 2 validation and 2
test patients per site. Runs that differ only in ``--data-seed`` (another phantom, another
split) are independent replications; this pools their pairs. A pair's seed becomes
``d<data seed>/s<run seed>`` (a run seed of one phantom shares nothing with the same run seed
of another), so both the pairs' and the whole seeds' bootstrap intervals
(:func:`fedcontrast.bench.stats.summarise`) treat each (data seed, run seed) as its own unit.
Per split (validation, test) and readout (full fine-tuning, the frozen-encoder probe), at the
final checkpoint as :mod:`pretrain_sweep` computes them for one run, or with ``--steps S`` at the
checkpoint after S fine-tuning steps (how much of a gain a longer budget keeps, from one run):

    python benchmarks/pooled_difference.py workspace/cine/smotion480_cine \
        workspace/cine/smotion480_cine_data1 --method supervised_motion --n 1 \
        --out benchmarks/results/label_efficiency_ablations/cine/pooled_cine

Writes ``<out>.json`` and ``<out>.md``. Refuses runs whose settings differ in more than the data
seed and the methods, or that share a data seed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from data_per_site import check_comparable
from pretrain_sweep import differences

from fedcontrast.bench.environment import run_environment
from fedcontrast.bench.report import format_difference, merge_runs, output_file
from fedcontrast.bench.stats import N_BOOT

#: Settings the pooled runs may differ in.
FREE = ("data_seed", "methods")
READOUTS = {"finetune": "full fine-tuning", "probe": "frozen-encoder probe"}
SPLITS = ("validation", "test")


def replication_seeds(configs: list[dict[str, Any]], runs: str) -> list[int]:
    """The data seed of each run configuration in ``configs``.

    Raises:
        ValueError: two runs share a data seed (``runs`` names them): they are not replications.
    """
    data_seeds = [config.get("data_seed", 0) for config in configs]
    if len(set(data_seeds)) < len(data_seeds):
        raise ValueError(f"{runs} share a data seed ({data_seeds}): not replications")
    return data_seeds


def pooled_seed(data_seed: int, seed: Any) -> str:
    """A run seed as a unit of its own across phantoms: ``d<data seed>/s<seed>``."""
    return f"d{data_seed}/s{seed}"


def pooled_rows(folders: list[Path], free: tuple[str, ...] = FREE) -> tuple[list[dict[str, Any]], list[int]]:
    """Every row of the run ``folders``, each seed renamed ``d<data seed>/s<seed>``; and the data seeds.

    Raises:
        ValueError: settings that differ in more than ``free``, or a data seed found twice.
    """
    loaded = {folder: merge_runs([folder])[:2] for folder in folders}
    check_comparable({folder: {"config": config} for folder, (config, _) in loaded.items()}, free=free)
    configs = [config for config, _ in loaded.values()]
    data_seeds = replication_seeds(configs, f"runs {[str(f) for f in folders]}")
    rows = [
        {**row, "seed": pooled_seed(data_seed, row["seed"])}
        for data_seed, (_, run_rows) in zip(data_seeds, loaded.values(), strict=True)
        for row in run_rows
    ]
    return rows, data_seeds


def at_checkpoint(rows: list[dict[str, Any]], steps: int | None) -> list[dict[str, Any]]:
    """The rows scored after ``steps`` fine-tuning steps; every row when ``steps`` is None (each
    cell then takes its final checkpoint).

    Raises:
        ValueError: no row was scored there; the message lists the checkpoints the rows have.
    """
    if steps is None:
        return rows
    kept = [row for row in rows if row["finetune_steps"] == steps]
    if not kept:
        checkpoints = sorted({row["finetune_steps"] for row in rows})
        raise ValueError(
            f"no row was scored at {steps} fine-tuning steps; the runs' checkpoints are {checkpoints}"
        )
    return kept


def pooled(
    folders: list[Path],
    method: str,
    n_labeled: int,
    n_boot: int = N_BOOT,
    free: tuple[str, ...] = FREE,
    steps: int | None = None,
) -> dict[str, Any]:
    """``{readout: {split: {mode: summary}}}`` of ``method`` minus random init over the runs' pairs
    (runs that differ in no setting but ``free``), at the final checkpoint or after ``steps``."""
    rows, data_seeds = pooled_rows(folders, free)
    rows = at_checkpoint(rows, steps)
    cells = {
        readout: {
            split: differences(rows, method, n_labeled, split, None, n_boot, readout) for split in SPLITS
        }
        for readout in READOUTS
    }
    return {
        "method": method,
        "n_labeled": n_labeled,
        "finetune_steps": steps,
        "data_seeds": data_seeds,
        "runs": [str(f) for f in folders],
        "cells": {r: c for r, c in cells.items() if any(c.values())},
        "environment": run_environment(folders),
    }


def cell_text(cell: dict[str, Any] | None) -> str:
    """A summary as ``+0.045 [0.026, 0.065] (seeds [0.031, 0.060]; 40 pairs)``; a dash for none."""
    if not cell:
        return "—"
    seeds = f"[{cell['seed_ci_low']:.3f}, {cell['seed_ci_high']:.3f}]"
    return f"{format_difference(cell)} (seeds {seeds}; {cell['n_pairs']} pairs)"


def checkpoint_text(steps: int | None) -> str:
    """Where the pairs were scored: the final checkpoint, or after ``steps`` fine-tuning steps."""
    return "the final checkpoint" if steps is None else f"the checkpoint after {steps} fine-tuning steps"


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"# {result['method']} minus random init, pooled over data seeds {result['data_seeds']} "
        f"(N = {result['n_labeled']})\n",
        f"Written by `{command}`. Paired on (data seed, run seed), site and split at "
        f"{checkpoint_text(result['finetune_steps'])}; "
        "95% bootstrap interval over the pairs, then over whole (data seed, run seed) units.\n",
        "| readout | mode | validation | test |",
        "|---|---|---|---|",
    ]
    for readout, by_split in result["cells"].items():
        for mode in ("local", "federated"):
            cells = [by_split[split].get(mode) for split in SPLITS]
            if any(cells):
                text = [cell_text(c) for c in cells]
                lines.append(f"| {READOUTS[readout]} | {mode} | {text[0]} | {text[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="bench run folders, one per data seed")
    parser.add_argument("--method", required=True)
    parser.add_argument("--n", type=int, default=1, help="labelled volumes per site")
    parser.add_argument("--n-boot", type=int, default=N_BOOT)
    parser.add_argument(
        "--free",
        nargs="*",
        default=list(FREE),
        help="settings the runs may differ in (e.g. pretrain_overrides: an encoder file per phantom)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="score the checkpoint after this many fine-tuning steps (default: the final one)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    command = "python benchmarks/pooled_difference.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    result = {
        "command": command,
        **pooled(args.runs, args.method, args.n, args.n_boot, tuple(args.free), args.steps),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(result, indent=1))
    text = markdown(result, command)
    output_file(args.out, ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
