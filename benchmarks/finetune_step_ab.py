"""Per-step CPU milliseconds of the bench's fine-tuning under two bundle folders, interleaved.

Two ``supervised`` trainers (random init, N labelled volumes, the cpu profile's network and 8
slices a step, one site) are built, one on a reference bundle folder and one on the current
bundle; their rounds alternate in one process, so both see the same machine load. Prints the
per-step CPU ms of every timed round, the data loader's ms per batch (alone, also interleaved)
and whether the two trainers' losses are bit-identical::

    git archive <before> bundles/cardiac_seg | tar -x -C /tmp/ref
    python benchmarks/finetune_step_ab.py --reference-bundle /tmp/ref/bundles/cardiac_seg \
        --splits OUT/splits/N1

``--splits`` is a split folder of ``benchmarks/finetune_unit_timing.py`` (its ``site-1.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import set_track_meta

from fedcontrast.bench.protocol import BenchConfig, FinetuneUnit
from fedcontrast.methods.supervised import SupervisedBundleTrainer


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-bundle", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True, help="folder holding site-1.json")
    parser.add_argument("--n-labeled", type=int, default=1)
    parser.add_argument("--steps", type=int, default=24, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = args.n_labeled
    config = BenchConfig(methods=["random_init"], budgets=[n], seeds=[0], sites=1, finetune_steps=args.steps)
    cfg = {
        **config.finetune_config(FinetuneUnit("random_init", 0, "local", n), ""),
        "local_steps": args.steps,
    }
    entries = [dict(e) for e in json.loads((args.splits / "site-1.json").read_text())["training"]]
    message = SupervisedBundleTrainer.initial_message(cfg)
    trainers = {
        "reference": SupervisedBundleTrainer(
            {**cfg, "bundle_dir": str(args.reference_bundle)}, entries, "site-1"
        ),
        "current": SupervisedBundleTrainer(cfg, entries, "site-1"),
    }
    step_ms: dict[str, list[float]] = {k: [] for k in trainers}
    losses: dict[str, list[list[float]]] = {k: [] for k in trainers}
    for round_num in range(args.rounds + 1):
        for name, trainer in trainers.items():
            start = time.process_time()
            trainer.local_round(message, round_num)
            if round_num:
                step_ms[name].append((time.process_time() - start) / args.steps * 1e3)
            losses[name].append(list(trainer._losses))
    loaders = {k: t.workflow.parser.get_parsed_content("train#dataloader") for k, t in trainers.items()}
    batch_ms: dict[str, list[float]] = {k: [] for k in trainers}
    set_track_meta(False)  # as in the trainer's rounds
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            start = time.process_time()
            for _ in range(30):
                next(iter(loader))
            batch_ms[name].append((time.process_time() - start) / 30 * 1e3)
    set_track_meta(True)
    result = {
        "step_ms": step_ms,
        "step_ms_median": {k: statistics.median(v) for k, v in step_ms.items()},
        "loader_batch_ms_median": {k: statistics.median(v) for k, v in batch_ms.items()},
        "losses_bit_identical": losses["reference"] == losses["current"],
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
