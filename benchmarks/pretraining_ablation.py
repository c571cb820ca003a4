"""Ablations of pre-training that need no fine-tuning: the representation diagnostics per round.

Runs one method (FCL by default) with the label-efficiency bench's data, network and budget
(``BenchConfig`` of ``--profile``), once per variant, and records per round and site the loss,
alignment, uniformity and leave-one-volume-out partition accuracy
(:mod:`fedcontrast.methods.diagnostics`) on each site's fixed probe set. Variants: the
projection head with or without BatchNorm, the momentum encoder re-initialised from the global
weights every round or kept, and a longer budget. Writes a JSON file in the shared results
format's spirit (``dataset``, ``config``, ``environment``, ``command``, ``variants``).

    python benchmarks/pretraining_ablation.py \
        --out benchmarks/results/label_efficiency_ablations/pretraining_ablation_fcl_s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedcontrast.bench.environment import environment
from fedcontrast.bench.protocol import PROFILES, BenchConfig, prepare_splits, pretraining_curve
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.volumes import pretraining_entries

#: name -> (pre-training overrides, budget multiplier)
VARIANTS: dict[str, tuple[dict, int]] = {
    "default (BatchNorm head, momentum from global)": ({}, 1),
    "head without BatchNorm": ({"head_norm": "none"}, 1),
    "momentum encoder kept across rounds": ({"momentum_init": "keep"}, 1),
    "4x the pre-training steps": ({}, 4),
}


def summarise(curve: list[dict]) -> dict[str, float]:
    """Mean over sites of the last round's diagnostics."""
    last = max(r["round"] for r in curve)
    final = [r for r in curve if r["round"] == last]
    keys = ("loss", "alignment", "uniformity", "partition_accuracy")
    return {k: float(np.mean([r[k] for r in final if k in r])) for k in keys if any(k in r for r in final)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="fcl")
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path("workspace/pretraining-ablation"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = BenchConfig(**PROFILES[args.profile])
    splits = prepare_splits(config, args.workdir)[min(config.budgets)]
    entries = {site: pretraining_entries(d) for site, d in splits.items()}
    results = {}
    for name in args.variants:
        overrides, factor = VARIANTS[name]
        cfg = {**config.pretrain_config(args.seed), **overrides}
        cfg["local_steps"] *= factor
        start = time.perf_counter()
        result = run_in_process(args.method, cfg, entries, config.pretrain_rounds)
        curve = pretraining_curve(result.history, cfg["local_steps"])
        results[name] = {
            "overrides": overrides,
            "steps_per_site": cfg["local_steps"] * config.pretrain_rounds,
            "final": summarise(curve),
            "curve": curve,
            "wall_s": time.perf_counter() - start,
        }
        print(name, results[name]["final"], flush=True)
    document = {
        "benchmark": "pretraining_ablation",
        "command": "python " + " ".join(sys.argv),
        "method": args.method,
        "seed": args.seed,
        "dataset": {
            "phantom": config.difficulty,
            "sites": config.sites,
            "patients_per_site": config.patients_per_site,
        },
        "config": {**config.pretrain_config(args.seed), "rounds": config.pretrain_rounds},
        "environment": environment(),
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
