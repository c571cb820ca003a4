"""Write the benchmark reports from a run folder of ``fedcontrast bench`` (finished or not).

    python benchmarks/bench_report.py workspace/bench-full [--out benchmarks/results]
        [--reports comparison fcl_vs_baselines communication]

Writes ``OUT/comparison/`` (results.json, report.md, plots), ``OUT/fcl_vs_baselines.{json,md}``
and ``OUT/communication.{json,md}`` (each only where named in ``--reports``); units still
missing are listed in the comparison report.

The committed results come from two runs (see ``benchmarks/results/README.md``).
"""

import argparse
import json
from pathlib import Path

from fedcontrast.bench.protocol import BenchConfig, load_rows
from fedcontrast.bench.report import write_communication, write_fcl_vs_baselines, write_report

REPORTS = {
    "comparison": lambda rows, config, run_dir, out: write_report(rows, config, run_dir, out / "comparison"),
    "fcl_vs_baselines": write_fcl_vs_baselines,
    "communication": write_communication,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reports", nargs="+", choices=list(REPORTS), default=list(REPORTS))
    args = parser.parse_args()
    config = BenchConfig(**json.loads((args.run_dir / "bench_config.json").read_text()))
    rows = load_rows(args.run_dir / "rows.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.reports:
        print(REPORTS[name](rows, config, args.run_dir, args.out))


if __name__ == "__main__":
    main()
