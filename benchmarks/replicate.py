"""How far two runs of one configuration lie apart: the benchmark's resolution (issue 10).

Reads the ``results.json`` of two label-efficiency runs with the same settings (the methods
may differ; e.g. the same grid on two CPUs, whose kernels round differently) and compares
them on what both hold:

- rows: the final-checkpoint test rows both runs scored (same method, mode, readout, N, seed,
  site): how many agree to the last digit, the mean and largest absolute Dice difference;
- cells: each paired difference (method minus random init, mode, readout, N) both runs
  hold with the same number of (seed, site) pairs: both means and intervals, how far the
  mean moved, and whether the verdict "interval above 0" / "below 0" changed.

Writes ``<out>.json`` and ``<out>.md``:

    python benchmarks/replicate.py A/results.json B/results.json --out benchmarks/results/replicate
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from data_per_site import check_comparable, load_run

from fedcontrast.bench.report import headline_rows, normalise_rows, output_file

#: Cell key fields of the report's ``summary.paired_differences``.
CELL = ("finetune", "readout", "method", "n_labeled")
#: Row key fields: one scored model.
ROW = ("method", "finetune", "readout", "n_labeled", "seed", "site")


def final_rows(run: dict[str, Any]) -> dict[tuple, float]:
    """Row key -> mean Dice of the run's final-checkpoint test rows."""
    return {tuple(r[k] for k in ROW): r["dice_mean"] for r in headline_rows(normalise_rows(run["rows"]))}


def verdict(cell: dict[str, Any]) -> str:
    """``"above 0"``, ``"below 0"`` or ``"across 0"``: where the cell's 95% interval lies."""
    if cell["ci_low"] > 0:
        return "above 0"
    return "below 0" if cell["ci_high"] < 0 else "across 0"


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows and cells of runs ``a`` and ``b`` compared (see the module docstring)."""
    rows_a, rows_b = final_rows(a), final_rows(b)
    common = sorted(set(rows_a) & set(rows_b), key=str)
    gaps = np.array([abs(rows_a[k] - rows_b[k]) for k in common])
    cells_a = {tuple(c[k] for k in CELL): c for c in a["summary"]["paired_differences"]}
    cells_b = {tuple(c[k] for k in CELL): c for c in b["summary"]["paired_differences"]}
    cells = []
    for key in sorted(set(cells_a) & set(cells_b), key=str):
        ca, cb = cells_a[key], cells_b[key]
        if ca["n_pairs"] != cb["n_pairs"]:
            continue  # one run is missing seeds of this cell: not the same estimate
        cells.append(
            {
                **dict(zip(CELL, key)),
                "n_pairs": ca["n_pairs"],
                "a": {k: ca[k] for k in ("mean", "ci_low", "ci_high")},
                "b": {k: cb[k] for k in ("mean", "ci_low", "ci_high")},
                "moved": cb["mean"] - ca["mean"],
                "verdict_a": verdict(ca),
                "verdict_b": verdict(cb),
            }
        )
    moved = np.array([abs(c["moved"]) for c in cells])
    return {
        "rows": {
            "common": len(common),
            "identical": int((gaps == 0).sum()),
            "mean_abs_dice_difference": float(gaps.mean()) if len(gaps) else None,
            "max_abs_dice_difference": float(gaps.max()) if len(gaps) else None,
        },
        "cells": cells,
        "cells_summary": {
            "n": len(cells),
            "mean_abs_moved": float(moved.mean()) if len(moved) else None,
            "median_abs_moved": float(np.median(moved)) if len(moved) else None,
            "max_abs_moved": float(moved.max()) if len(moved) else None,
            "verdict_changed": sum(c["verdict_a"] != c["verdict_b"] for c in cells),
        },
    }


def markdown(result: dict[str, Any], names: tuple[str, str], command: str) -> str:
    """The comparison as a markdown page: the command, the row and cell summaries, every cell."""
    rows, summary = result["rows"], result["cells_summary"]
    a, b = names
    lines = [
        f"# Replicate: {a} against {b}\n",
        f"Written by `{command}`.\n",
        f"**Rows.** {rows['common']} final-checkpoint test rows in both runs; {rows['identical']} agree to "
        f"the last digit; mean absolute Dice difference {rows['mean_abs_dice_difference']:.3f}, largest "
        f"{rows['max_abs_dice_difference']:.3f}.\n",
        f"**Paired differences (method minus random init).** {summary['n']} cells with the same pairs in "
        f"both runs; the mean moved by {summary['mean_abs_moved']:.3f} on average (median "
        f"{summary['median_abs_moved']:.3f}, largest {summary['max_abs_moved']:.3f}); the verdict of the "
        f"95% interval (above, across or below 0) changed in {summary['verdict_changed']} of them.\n",
        f"| fine-tuning | readout | method | N | {a} | {b} | moved |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        cells = [f"{c[x]['mean']:+.3f} [{c[x]['ci_low']:.3f}, {c[x]['ci_high']:.3f}]" for x in ("a", "b")]
        mark = " (verdict changed)" if c["verdict_a"] != c["verdict_b"] else ""
        lines.append(
            f"| {c['finetune']} | {c['readout']} | {c['method']} | {c['n_labeled']} | {cells[0]} | "
            f"{cells[1]} | {c['moved']:+.3f}{mark} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs=2, help="two results.json files (or their folders)")
    parser.add_argument("--names", nargs=2, default=None, help="how the report names the two runs")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    runs = {path: load_run(path) for path in args.runs}
    check_comparable(runs, free=("methods",))
    result = compare(*runs.values())
    names = tuple(args.names or (str(p) for p in args.runs))
    command = "python benchmarks/replicate.py " + shlex.join(
        [*(str(p) for p in args.runs), *(["--names", *names] if args.names else []), "--out", str(args.out)]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        "runs": [str(p) for p in args.runs],
        "environments": [run["environment"] for run in runs.values()],
        **result,
    }
    output_file(args.out, ".json").write_text(json.dumps(document, indent=1) + "\n")
    output_file(args.out, ".md").write_text(markdown(result, names, command))
    print(output_file(args.out, ".md"))


if __name__ == "__main__":
    main()
