"""Every pooled difference in one figure, against the target (issue 10).

Reads outputs of :mod:`pooled_difference` (``LABEL=PATH``: a method minus random init, pooled over
phantoms) and draws, per split (validation, test) and cell (local and federated full fine-tuning,
the federated frozen-encoder probe), each entry's mean difference with its 95% bootstrap interval
over the pairs (one x axis per column), with a line at 0 and, on the full fine-tuning panels the target is
set for, one at its difference (:data:`fedcontrast.bench.report.TARGET`). Writes ``<out>.png`` and
the same numbers as ``<out>.md``.

    python benchmarks/pooled_forest.py "FCL=cine/pooled_fcl.json" "fedmotion=cine/pooled_cine.json" \\
        --out benchmarks/results/label_efficiency_ablations/pooled_forest

An entry may also be a :mod:`choose_recipe` output: per fine-tuning mode, the recipe chosen on
validation (its column minus random init at random init's own recipe); it has no probe cells.

Refuses inputs whose label budgets differ (one figure, one N).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pooled_difference import SPLITS, cell_text

from fedcontrast.bench.report import TARGET, output_file, pyplot

#: The panels' (readout, mode) cells and their titles.
CELLS = (
    ("finetune", "local", "local fine-tuning"),
    ("finetune", "federated", "federated fine-tuning"),
    ("probe", "federated", "frozen-encoder probe (federated)"),
)


def from_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A :mod:`choose_recipe` output as a pooled result: per mode, the chosen recipe's full
    fine-tuning cells on each split.

    Raises:
        ValueError: the chosen cells hold different label budgets.
    """
    picked = {mode: choice["recipes"][label] for mode, label in choice["chosen"].items()}
    cells = {split: {mode: recipe[split][mode] for mode, recipe in picked.items()} for split in SPLITS}
    budgets = {cell["n_labeled"] for by_mode in cells.values() for cell in by_mode.values()}
    if len(budgets) != 1:
        raise ValueError(f"the chosen recipes hold different label budgets {sorted(budgets)}")
    return {"command": choice["command"], "n_labeled": budgets.pop(), "cells": {"finetune": cells}}


def load_entries(specs: list[str]) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """``(label, pooled result)`` per ``LABEL=PATH`` spec, and their common label budget.

    Raises:
        ValueError: a spec without ``=``, or results of different label budgets.
    """
    entries = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"{spec!r}: expected LABEL=PATH")
        result = json.loads(Path(path).read_text())
        entries.append((label, from_choice(result) if result.get("benchmark") == "choose_recipe" else result))
    budgets = {result["n_labeled"] for _, result in entries}
    if len(budgets) != 1:
        raise ValueError(
            f"the pooled results hold different label budgets {sorted(budgets)}: one N per figure"
        )
    return entries, budgets.pop()


def summary(result: dict[str, Any], readout: str, split: str, mode: str) -> dict[str, Any] | None:
    """The pooled summary of one cell, or None where the result has none."""
    return result["cells"].get(readout, {}).get(split, {}).get(mode)


def plot(entries: list[tuple[str, dict[str, Any]]], n_labeled: int, path: Path) -> None:
    """The figure: one row per split, one column per cell of :data:`CELLS`; entries top to bottom."""
    plt = pyplot()
    size = (4.2 * len(CELLS), 0.9 * len(entries) + 2.0)
    fig, axes = plt.subplots(len(SPLITS), len(CELLS), figsize=size, sharex="col")
    rows = list(range(len(entries)))[::-1]
    for i, split in enumerate(SPLITS):
        for j, (readout, mode, title) in enumerate(CELLS):
            ax = axes[i, j]
            for row, (_, result) in zip(rows, entries, strict=True):
                cell = summary(result, readout, split, mode)
                if cell:
                    low, high = cell["mean"] - cell["ci_low"], cell["ci_high"] - cell["mean"]
                    ax.errorbar(cell["mean"], row, xerr=[[low], [high]], fmt="o", color="C0", capsize=3)
            ax.axvline(0.0, color="grey", lw=0.8)
            if readout == TARGET["readout"]:
                target = TARGET["difference"]
                ax.axvline(target, color="C3", ls="--", lw=0.8, label=f"target +{target}")
            ax.set_yticks(rows, [label for label, _ in entries] if j == 0 else [])
            ax.set_title(f"{title}, {split}", fontsize=9)
            ax.set_xlabel(f"minus random init, N = {n_labeled} (mean Dice)", fontsize=8)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(entries: list[tuple[str, dict[str, Any]]], n_labeled: int, command: str) -> str:
    """The figure's numbers as a table, one line per entry and split."""
    header = [title for *_, title in CELLS]
    lines = [
        f"# Pooled differences at N = {n_labeled} against the target (+{TARGET['difference']})\n",
        f"Written by `{command}`. Each entry: method minus random init, paired on (data seed, run seed), "
        "site and split, 95% bootstrap interval over the pairs (then over whole seeds), from its "
        "`pooled_difference.py` file; an entry from a `choose_recipe.py` file holds, per mode, the "
        "fine-tuning recipe chosen on validation, minus random init at its own recipe.\n",
        f"| entry | split | {' | '.join(header)} | file |",
        "|---|---|" + "---|" * len(CELLS) + "---|",
    ]
    for label, result in entries:
        for split in SPLITS:
            cells = [cell_text(summary(result, readout, split, mode)) for readout, mode, _ in CELLS]
            source = result["command"].split("--out ")[-1]
            lines.append(f"| {label} | {split} | {' | '.join(cells)} | `{source}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("entries", nargs="+", metavar="LABEL=PATH", help="pooled_difference.py JSON files")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    entries, n_labeled = load_entries(args.entries)
    command = "python benchmarks/pooled_forest.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(entries, n_labeled, output_file(args.out, ".png"))
    text = markdown(entries, n_labeled, command)
    output_file(args.out, ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
