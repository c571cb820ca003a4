"""How much partition signal is there to learn? Partition accuracy of pixels, random and pre-trained encoders.

FCL's and local CL's positives are slices of the same partition (SPEC §0) of other volumes. If
the phantom's partitions are hard to tell apart, those positives carry little that a decoder
cannot learn from one labelled volume. This measures the leave-one-volume-out nearest-mean
partition accuracy (:func:`~fedcontrast.methods.diagnostics.partition_accuracy`, chance 1/S)
on every pre-training volume of each site, one slice per partition and volume (the same
sampler as pre-training, unaugmented), for:

- ``pixels``: the slices themselves, each standardised and flattened;
- ``random encoder``: the deepest feature map of the bundle network's encoder at its
  initialisation for the run seed, average-pooled;
- each pre-trained encoder file given (``NAME=PATH``), the same way.

It also measures how much the same features tell the *site* a slice comes from (``site_accuracy``:
the same leave-one-volume-out nearest-mean rule over every site's slices, chance 1/sites): a
contrastive task whose negatives come from other sites (FCL's feature exchange) can be solved by
the site's appearance alone.

    python benchmarks/partition_signal.py --run workspace/le-cpu \
        --encoders fcl=workspace/le-cpu/pretrain/fcl_s0/global.pt \
        --out benchmarks/results/label_efficiency_ablations/partition_signal.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from fedcontrast.bench.environment import environment
from fedcontrast.bench.protocol import BenchConfig
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.methods.diagnostics import partition_accuracy
from fedcontrast.methods.partitions import PartitionBatch, PartitionSampler
from fedcontrast.methods.volumes import load_volumes, pretraining_entries
from fedcontrast.nets.bundle import build_network, read_encoder


def pooled_features(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` slices -> ``(B, C')`` average-pooled deepest encoder features."""
    encoder.eval()
    with torch.no_grad():
        deepest = encoder(images)[-1]
    return deepest.flatten(2).mean(-1)


def standardised_pixels(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` slices -> ``(B, C*H*W)``, each sample with zero mean and unit std."""
    flat = images.flatten(1).float()
    return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)


def run_config(run: Path) -> BenchConfig:
    """The configuration a bench run folder saved."""
    saved = json.loads((run / "bench_config.json").read_text())
    return BenchConfig(**{f.name: saved[f.name] for f in fields(BenchConfig) if f.name in saved})


def load_encoder(config: BenchConfig, path: str | Path) -> torch.nn.Module:
    """The bench network's encoder with the encoder file ``path`` loaded."""
    encoder = build_network(None, config.bundle).encoder
    encoder.load_state_dict(read_encoder(path)[0])
    return encoder


def load_encoders(config: BenchConfig, specs: list[str], seed: int) -> dict[str, torch.nn.Module]:
    """``{"random encoder": ..., NAME: ...}``: the bench network's encoder initialised by ``seed``,
    then each ``NAME=PATH`` encoder file (:func:`load_encoder`)."""
    torch.manual_seed(seed)
    encoders = {"random encoder": build_network(None, config.bundle).encoder}
    for spec in specs:
        name, path = spec.split("=", 1)
        encoders[name] = load_encoder(config, path)
    return encoders


def encoder_parser(description: str) -> argparse.ArgumentParser:
    """Options shared by the encoder diagnostics: run folder, encoders, seed, partitions, output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=Path, required=True, help="a fedcontrast bench run folder")
    parser.add_argument("--encoders", nargs="*", default=[], metavar="NAME=PATH")
    parser.add_argument("--seed", type=int, default=0, help="the random encoder's initialisation seed")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def site_batches(
    run: Path, config: BenchConfig, partitions: int, seed: int
) -> Iterator[tuple[str, PartitionBatch, int]]:
    """Per site of ``run``: its name, one unaugmented slice per partition of every pre-training
    volume (the pre-training sampler's batch) and the number of volumes."""
    sampler = PartitionSampler(partitions, 2, 1)
    split_dir = run / "splits" / f"N{min(config.budgets)}"
    for path in sorted(split_dir.glob("site-*.json")):
        volumes = load_volumes(pretraining_entries(load_site_datalist(path)), None, config.bundle)
        batch = sampler.sample(volumes, list(range(len(volumes))), 0, np.random.default_rng(seed))
        yield path.stem, batch, len(volumes)


def main(argv: list[str] | None = None) -> int:
    args = encoder_parser(__doc__.split("\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    config = run_config(args.run)
    encoders = load_encoders(config, args.encoders, args.seed)
    results: dict[str, dict[str, float]] = {}
    by_site: list[dict[str, torch.Tensor]] = []
    site_volumes: list[torch.Tensor] = []
    for site, batch, volumes in site_batches(args.run, config, args.partitions, args.seed):
        features = {"pixels": standardised_pixels(batch.images)}
        features.update({name: pooled_features(e, batch.images) for name, e in encoders.items()})
        features = {name: torch.nn.functional.normalize(z, dim=1) for name, z in features.items()}
        results[site] = {
            n: partition_accuracy(z, batch.partitions, batch.volumes) for n, z in features.items()
        }
        results[site]["volumes"] = volumes
        by_site.append(features)
        site_volumes.append(batch.volumes + sum(len(v.unique()) for v in site_volumes))
        print(site, results[site], flush=True)
    names = [n for n in next(iter(results.values())) if n != "volumes"]
    site_labels = torch.cat([torch.full_like(v, i) for i, v in enumerate(site_volumes)])
    all_volumes = torch.cat(site_volumes)
    site_accuracy = {
        n: partition_accuracy(torch.cat([f[n] for f in by_site]), site_labels, all_volumes) for n in names
    }
    document = {
        "benchmark": "partition_signal",
        "command": "python " + " ".join(sys.argv),
        "chance": 1 / args.partitions,
        "config": {"bundle": config.bundle, "difficulty": config.difficulty, "sites": config.sites},
        "environment": environment(),
        "sites": results,
        "mean": {n: float(np.mean([r[n] for r in results.values()])) for n in names},
        "site_accuracy": site_accuracy,
        "site_chance": 1 / len(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    print(json.dumps(document["mean"]), "site accuracy:", json.dumps(site_accuracy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
