"""Which encoder stages does pre-training move towards what segmentation uses? Linear CKA per stage.

The supervised ceiling (``fedcontrast bench --methods supervised_ceiling``) pre-trains the
encoder with every pre-training volume's label, so its features are ones the decoder can use.
This compares every other encoder with it, stage by stage: linear centred kernel alignment
(CKA, Kornblith et al., ICML 2019; 1 for features equal up to a rotation and scale, near 0 for
unrelated ones) between the two encoders' feature maps on the same slices, each pixel of each
slice a sample, its channels the features. The slices are one unaugmented slice per partition
of every pre-training volume of each site (:func:`partition_signal.site_batches`), never a test
volume. An encoder that pre-training moved towards the ceiling has a higher CKA with it than the
random encoder has.

    python benchmarks/encoder_similarity.py --run workspace/grid90 \
        --reference workspace/grid90/pretrain/supervised_ceiling_s0/global.pt \
        --encoders fcl=workspace/grid90/pretrain/fcl_s0/global.pt ... \
        --out benchmarks/results/label_efficiency_ablations/encoder_similarity.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from partition_signal import encoder_parser, load_encoder, load_encoders, run_config, site_batches

from fedcontrast.bench.environment import environment


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices ``(n, p)`` and ``(n, q)`` with the same ``n`` samples."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def stage_features(encoder: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """``(B, C, H, W)`` slices -> per encoder stage, its feature map as ``(B * H' * W', C')`` rows."""
    encoder.eval()
    with torch.no_grad():
        maps = encoder(images)
    return [m.movedim(1, -1).reshape(-1, m.shape[1]) for m in maps]


def main(argv: list[str] | None = None) -> int:
    parser = encoder_parser(__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="the encoder file compared with")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = run_config(args.run)
    encoders = load_encoders(config, args.encoders, args.seed)
    reference = load_encoder(config, args.reference)
    results: dict[str, dict[str, list[float]]] = {}
    for site, batch, _ in site_batches(args.run, config, args.partitions, args.seed):
        target = stage_features(reference, batch.images)
        results[site] = {
            name: [linear_cka(f, t) for f, t in zip(stage_features(e, batch.images), target, strict=True)]
            for name, e in encoders.items()
        }
        print(site, {n: np.round(v, 3).tolist() for n, v in results[site].items()}, flush=True)
    names = list(next(iter(results.values())))
    document = {
        "benchmark": "encoder_similarity",
        "command": "python " + " ".join(sys.argv),
        "reference": str(args.reference),
        "metric": "linear CKA with the reference encoder per stage (shallow to deep), mean over sites",
        "config": {"bundle": config.bundle, "difficulty": config.difficulty, "sites": config.sites},
        "environment": environment(),
        "sites": results,
        "mean": {n: np.mean([r[n] for r in results.values()], axis=0).round(4).tolist() for n in names},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    print(json.dumps(document["mean"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
