"""CPU time of one bench fine-tuning unit at the cpu profile's size, one site, and its rows.

Runs ``fedcontrast.bench.protocol.finetune_unit`` (random init, local fine-tuning, N labelled
volumes, the cpu profile's network and 8 slices a step) on a one-site phantom and prints the
process CPU seconds, the wall seconds and every checkpoint's Dice; the rows' scores go to
``OUT/rows_min.json`` so two code versions can be compared for bit-identity::

    python benchmarks/finetune_unit_timing.py --steps 96 --out workspace/unit-timing
    cmp before/rows_min.json after/rows_min.json

``--profile FILE`` also writes a cProfile (CPU-time clock) of the unit.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedcontrast.bench.protocol import BenchConfig, FinetuneUnit, finetune_unit, prepare_splits


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96, help="fine-tuning steps of the unit")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--n-labeled", type=int, default=1)
    parser.add_argument("--patients", type=int, default=24, help="phantom patients of the site")
    parser.add_argument("--mode", default="local", choices=["local", "federated"])
    parser.add_argument("--out", type=Path, required=True, help="phantom, splits and rows_min.json")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the unit here")
    args = parser.parse_args(argv)
    n = args.n_labeled
    config = BenchConfig(
        methods=["random_init"],
        budgets=[n],
        seeds=[0],
        sites=1,
        patients_per_site=args.patients,
        finetune_steps=args.steps,
        finetune_checkpoints=args.checkpoints,
    )
    splits = prepare_splits(config, args.out)[n]
    torch.set_num_threads(1)
    profile = cProfile.Profile(time.process_time) if args.profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profile:
        profile.enable()
    rows = finetune_unit(
        config, FinetuneUnit("random_init", 0, args.mode, n), splits, None, None, args.out / "ex"
    )
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)
    keys = ("finetune_steps", "eval_split", "dice", "dice_mean", "hd95_mean")
    (args.out / "rows_min.json").write_text(json.dumps([{k: r[k] for k in keys} for r in rows], indent=1))
    result = {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "steps": args.steps,
        "dice_mean": [(r["finetune_steps"], r["eval_split"], r["dice_mean"]) for r in rows],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
