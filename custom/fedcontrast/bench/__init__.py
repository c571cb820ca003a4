"""``fedcontrast bench``: the published comparison protocol on the phantom or any supported dataset.

See :mod:`fedcontrast.bench.protocol` for what runs and :mod:`fedcontrast.bench.report` for
what is written (rows in the shared results format, a markdown report, plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcontrast.bench.protocol import RANDOM_INIT, BenchConfig, run_benchmark

#: ``--quick``: two sites, one seed, N = 1, one round each, a tiny network: every method in minutes.
QUICK = {
    "budgets": [1],
    "seeds": [0],
    "sites": 2,
    "patients_per_site": 3,
    "pretrain_rounds": 1,
    "finetune_rounds": 1,
    "finetune_epochs": 2,
    "network": {
        "init_filters": 4,
        "blocks_down": [1, 1, 1],
        "inplane_spacing": 3.0,
        "roi_size": [48, 48],
        "patch_size": [32, 32, 8],
    },
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedcontrast bench``."""
    parser = subparsers.add_parser("bench", help="compare every pre-training method (SPEC §7 protocol)")
    parser.add_argument("--quick", action="store_true", help="a small run of every method (minutes)")
    parser.add_argument(
        "--methods", nargs="+", help="default: random_init and every registered pre-training method"
    )
    parser.add_argument("--budgets", nargs="+", type=int, help="labelled volumes per site (default 1 2 4 8)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run seeds (default 0 1 2)")
    parser.add_argument("--sites", type=int, help="phantom sites, or sites to deal a one-site dataset to")
    parser.add_argument("--patients-per-site", type=int)
    parser.add_argument("--pretrain-rounds", type=int)
    parser.add_argument("--finetune-rounds", type=int)
    parser.add_argument("--dataset", type=Path, help="a dataset folder instead of the phantom")
    parser.add_argument("--format", default="acdc", choices=["acdc", "mnms", "decathlon"])
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--out", type=Path, default=Path("workspace/bench"), help="run folder (resumable)")
    parser.add_argument(
        "--report", type=Path, help="where the report, result JSON and plots go (default: the run folder)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run or resume the benchmark, then write its report."""
    from fedcontrast.methods.registry import get_method

    settings = dict(QUICK) if args.quick else {}
    for name in (
        "methods",
        "budgets",
        "seeds",
        "sites",
        "patients_per_site",
        "pretrain_rounds",
        "finetune_rounds",
    ):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    config = BenchConfig(**settings)
    for method in config.methods:
        if method != RANDOM_INIT:
            get_method(method)  # a clear error for an unknown name, before any work
    rows = run_benchmark(config, args.out, args.workers, args.dataset, args.format)
    from fedcontrast.bench.report import write_report

    report = write_report(rows, config, args.out, args.report or args.out)
    print(f"{len(rows)} rows in {args.out / 'rows.jsonl'}; report: {report}")
    return 0
