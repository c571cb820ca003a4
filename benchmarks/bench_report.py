"""Write every benchmark report from a run folder of ``fedcontrast bench`` (finished or not).

    python benchmarks/bench_report.py workspace/bench-full [--out benchmarks/results]

Writes ``OUT/comparison/`` (results.json, report.md, plots), ``OUT/fcl_vs_baselines.{json,md}``
and ``OUT/communication.{json,md}``; units still missing are listed in the comparison report.
"""

import argparse
import json
from pathlib import Path

from fedcontrast.bench.protocol import BenchConfig, load_rows
from fedcontrast.bench.report import write_communication, write_fcl_vs_baselines, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    config = BenchConfig(**json.loads((args.run_dir / "bench_config.json").read_text()))
    rows = load_rows(args.run_dir / "rows.jsonl")
    for path in (
        write_report(rows, config, args.run_dir, args.out / "comparison"),
        write_fcl_vs_baselines(rows, config, args.run_dir, args.out),
        write_communication(rows, config, args.run_dir, args.out),
    ):
        print(path)


if __name__ == "__main__":
    main()
