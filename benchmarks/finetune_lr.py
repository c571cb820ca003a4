"""Choose the fine-tuning learning rate on random init's validation curves (issue 10).

Reads the ``results.json`` of random-init bench runs that differ only in ``finetune_lr`` (and
in which seeds ran), takes each run's validation curves (the report's
``random_init_plateau``: mean validation Dice over seeds and sites at every checkpoint, one
curve per mode and N), and chooses the learning rate with the best mean over the curves at
``--at`` steps (the budget the grid can afford) and at the runs' last checkpoint, averaged.
Writes ``finetune_lr.json`` (every curve, the scores, the choice and how far each curve is
at ``--at`` from its own last checkpoint) and ``finetune_lr.png``. No test row is read.

    python benchmarks/finetune_lr.py RUN/results.json ... --at 96 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from data_per_site import check_comparable, load_run

from fedcontrast.bench.report import pyplot, save_figure

#: Settings the runs may differ in.
FREE = ("finetune_lr", "seeds")


def curves(run: dict[str, Any]) -> dict[str, dict[int, float]]:
    """``"<mode> N=<n>"`` -> {steps: mean validation Dice} of random init's fine-tuning curves."""
    return {
        f"{c['mode']} N={c['n_labeled']}": dict(zip(c["steps"], c["dice"]))
        for c in run["summary"]["random_init_plateau"]
        if c["readout"] == "finetune"
    }


def score(curve_set: dict[str, dict[int, float]], at: int) -> dict[str, Any]:
    """Mean Dice over the curves at ``at`` steps and at the last checkpoint, their mean, and each
    curve's shortfall at ``at`` from its last checkpoint (positive: still rising)."""
    if any(at not in c for c in curve_set.values()):
        raise ValueError(f"every curve needs a checkpoint at {at} steps")
    last = {name: c[max(c)] for name, c in curve_set.items()}
    at_budget = float(np.mean([c[at] for c in curve_set.values()]))
    at_last = float(np.mean(list(last.values())))
    return {
        "mean_at_budget": at_budget,
        "mean_at_last": at_last,
        "score": (at_budget + at_last) / 2,
        "shortfall_at_budget": {name: last[name] - c[at] for name, c in curve_set.items()},
    }


def plot(runs: dict[float, dict[str, dict[int, float]]], at: int, path: Path) -> None:
    """One panel per (mode, N): validation Dice against steps, one line per learning rate."""
    plt = pyplot()
    names = sorted(next(iter(runs.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        for lr, curve_set in sorted(runs.items()):
            steps = sorted(curve_set[name])
            ax.plot(steps, [curve_set[name][s] for s in steps], marker=".", label=f"lr {lr:g}")
        ax.axvline(at, color="grey", lw=0.8, ls=":")
        ax.set_title(f"random init, {name}", fontsize=9)
        ax.set_xlabel("fine-tuning steps")
    np.atleast_1d(axes)[0].set_ylabel("mean validation Dice")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="results.json of each run (or its folder)")
    parser.add_argument(
        "--at", type=int, required=True, help="the fine-tuning budget the choice is for (steps)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for finetune_lr.json and .png")
    args = parser.parse_args(argv)
    runs = {path: load_run(path) for path in args.runs}
    check_comparable(runs, FREE)
    by_lr = {run["config"]["finetune_lr"]: curves(run) for run in runs.values()}
    if len(by_lr) != len(runs):
        raise ValueError("two runs have the same finetune_lr")
    scores = {lr: score(curve_set, args.at) for lr, curve_set in by_lr.items()}
    chosen = max(scores, key=lambda lr: scores[lr]["score"])
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "rule": f"highest mean of (mean validation Dice over the curves at {args.at} steps, the same at the "
        "last checkpoint); random init only, validation patients only",
        "runs": [str(p) for p in args.runs],
        "seeds": {lr: run["config"]["seeds"] for lr, run in zip(by_lr, runs.values())},
        "curves": {str(lr): c for lr, c in by_lr.items()},
        "scores": {str(lr): s for lr, s in scores.items()},
        "chosen": chosen,
    }
    (args.out / "finetune_lr.json").write_text(json.dumps(document, indent=1))
    plot(by_lr, args.at, args.out / "finetune_lr.png")
    for lr, s in sorted(scores.items()):
        print(f"lr {lr:g}: {s['mean_at_budget']:.3f} at {args.at} steps, {s['mean_at_last']:.3f} at the last")
    print(f"chosen: {chosen:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
