"""FCL minus random init against the unlabelled data per site (issue 10's data-per-site ablation).

Reads the ``results.json`` of bench runs that differ only in ``patients_per_site`` (and in
which seeds and methods ran), and writes one JSON with, per run, the paired differences of
``--method`` minus random init at ``--n-labeled`` for every readout (taken from the report's
summary: 95% bootstrap over seeds x sites, and over whole seeds), and the method's partition
accuracy after pre-training; plus a plot of the differences against patients per site.

    python benchmarks/data_per_site.py RUN/results.json ... --out DIR

Raises a clear error when the runs differ in any other setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedcontrast.bench.protocol import with_defaults
from fedcontrast.bench.report import errorbar, pyplot, save_figure

#: Settings the runs may differ in; any other difference makes them incomparable.
FREE = ("patients_per_site", "seeds", "methods")


def load_run(path: Path) -> dict[str, Any]:
    """``results.json`` of a bench run (the file, or the folder holding it)."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no results.json (run benchmarks/bench_report.py on the run first)")
    return json.loads(file.read_text())


def check_comparable(runs: dict[Path, dict[str, Any]], free: tuple[str, ...] = FREE) -> None:
    """Refuse runs whose configurations differ in anything but ``free`` (names the runs and keys).

    A setting missing from a run's configuration (added to the bench after that run) counts as
    its default, as when a run folder is resumed.
    """
    (first_path, first), *rest = runs.items()
    for path, run in rest:
        a, b = with_defaults(first["config"]), with_defaults(run["config"])
        differ = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
        if differ:
            raise ValueError(f"{first_path} and {path} differ in {', '.join(differ)}: not one ablation")


def summarise(run: dict[str, Any], method: str, n_labeled: int) -> dict[str, Any]:
    """Patients per site, seeds, the paired differences by readout and the last partition accuracy."""
    cells = [
        c
        for c in run["summary"]["paired_differences"]
        if c["method"] == method and c["n_labeled"] == n_labeled
    ]
    if not cells:
        raise ValueError(f"no paired difference of {method} at N={n_labeled} in the run")
    keep = ("mean", "ci_low", "ci_high", "seed_ci_low", "seed_ci_high", "std_seeds", "n_seeds", "n_sites")
    curve = run["summary"]["pretraining"].get(method, {})
    accuracy = [a for a in curve.get("partition_accuracy", []) if a is not None]
    return {
        "patients_per_site": run["config"]["patients_per_site"],
        "seeds": run["config"]["seeds"],
        "differences": {f"{c['finetune']} {c['readout']}": {k: c[k] for k in keep} for c in cells},
        "partition_accuracy_last_round": accuracy[-1] if accuracy else None,
    }


def plot(points: list[dict[str, Any]], method: str, n_labeled: int, path: Path) -> None:
    """Difference against patients per site (log axis), one line per readout, 95% intervals."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    readouts = sorted(points[0]["differences"])
    for shift, readout in zip(np.linspace(-0.04, 0.04, len(readouts)), readouts):
        xs = [p["patients_per_site"] * 10**shift for p in points]  # side by side on the log axis
        errorbar(ax, xs, [p["differences"][readout] for p in points], label=readout)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axhline(0.05, color="grey", lw=0.8, ls=":", label="target +0.05")
    ax.set_xscale("log")
    ax.set_xticks([p["patients_per_site"] for p in points], [str(p["patients_per_site"]) for p in points])
    ax.set_xlabel("patients per site (2 volumes each; 4 held out for test and validation)")
    ax.set_ylabel(f"{method} minus random init, mean Dice, N={n_labeled}")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="results.json of each run (or its folder)")
    parser.add_argument("--method", default="fcl")
    parser.add_argument("--n-labeled", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="folder for data_per_site.json and .png")
    args = parser.parse_args(argv)
    runs = {path: load_run(path) for path in args.runs}
    check_comparable(runs)
    points = sorted(
        (summarise(run, args.method, args.n_labeled) for run in runs.values()),
        key=lambda p: p["patients_per_site"],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    shared = {k: v for k, v in next(iter(runs.values()))["config"].items() if k not in FREE}
    document = {
        "method": args.method,
        "n_labeled": args.n_labeled,
        "runs": [str(p) for p in args.runs],
        "shared_config": shared,
        "points": points,
    }
    (args.out / "data_per_site.json").write_text(json.dumps(document, indent=1))
    plot(points, args.method, args.n_labeled, args.out / "data_per_site.png")
    for p in points:
        cells = ", ".join(
            f"{r} {c['mean']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
            for r, c in p["differences"].items()
        )
        print(f"{p['patients_per_site']} patients/site, seeds {p['seeds']}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
