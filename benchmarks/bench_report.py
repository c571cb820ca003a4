"""Write the benchmark reports from one or more run folders of ``fedcontrast bench`` (finished or not).

    python benchmarks/bench_report.py RUN [RUN ...] [--out benchmarks/results]
        [--reports label_efficiency fcl_vs_baselines communication] [--n-boot 10000]

Several folders must hold runs of one configuration apart from their methods (a method
added later runs as its own column); each method's rows come from the first folder that
has it, and the report says how far a repeated method (random init) lies from itself.

Writes ``OUT/label_efficiency/`` (results.json, report.md, plots), ``OUT/fcl_vs_baselines.{json,md}``
and ``OUT/communication.{json,md}`` (each only where named in ``--reports``); units still
missing are listed in the label-efficiency report.

Where the committed results come from: ``benchmarks/results/README.md``.
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

from fedcontrast.bench.report import merge_runs, write_communication, write_fcl_vs_baselines, write_report

REPORTS = ("label_efficiency", "fcl_vs_baselines", "communication")


def main(argv: list[str] | None = None) -> list[Path]:
    """Parse ``argv`` and write the reports; returns their paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reports", nargs="+", choices=REPORTS, default=["label_efficiency"])
    parser.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples per interval")
    args = parser.parse_args(argv)
    settings, rows, provenance = merge_runs(args.run_dirs)
    config = SimpleNamespace(**settings)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in args.reports:
        if name == "label_efficiency":
            out = args.out / "label_efficiency"
            written.append(write_report(rows, config, args.run_dirs, out, args.n_boot, provenance))
        elif name == "fcl_vs_baselines":
            written.append(write_fcl_vs_baselines(rows, config, args.run_dirs, args.out))
        else:
            written.append(write_communication(rows, config, args.run_dirs, args.out))
        print(written[-1])
    return written


if __name__ == "__main__":
    main()
