"""Encoder files that take some stages from a donor encoder and the rest from a random encoder.

Which of the supervised ceiling's encoder stages carries its fine-tuning gain? A hybrid
encoder answers it when fine-tuned like any column. Stage 1 is ``conv_init`` and ``layers.0``
of MONAI's ``SegResEncoder``, stage ``k > 1`` is ``layers.{k-1}``; the stages not taken from
the donor come from the bench network's encoder initialised by the run seed (the diagnostics'
random encoder). One file per seed:

    python benchmarks/hybrid_encoder.py --run workspace/grid90 --seeds 0 1 2 3 4 \
        --donor 'workspace/grid90/pretrain/supervised_ceiling_s{seed}/global.pt' --stages 1 2 \
        --out 'workspace/hybrid/ceiling_stages12_s{seed}.pt'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from partition_signal import run_config

from fedcontrast.nets.bundle import build_network, encoder_options, read_encoder, save_encoder


def stage_of(key: str) -> int:
    """The encoder stage (1-based) an encoder state-dict key belongs to."""
    if key.startswith("conv_init"):
        return 1
    return int(key.split(".")[1]) + 1  # layers.<i>.*


def hybrid(donor: dict[str, torch.Tensor], random: dict[str, torch.Tensor], stages: set[int]) -> dict:
    """``donor``'s entries of ``stages``, ``random``'s of the others (the same keys in both)."""
    if donor.keys() != random.keys():
        raise ValueError(f"the encoders differ in keys: {sorted(donor.keys() ^ random.keys())[:5]}")
    return {k: (donor if stage_of(k) in stages else random)[k].clone() for k in random}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a fedcontrast bench run folder")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--donor", required=True, help="encoder file; {seed} is replaced")
    parser.add_argument("--stages", nargs="+", type=int, required=True, help="stages taken from the donor")
    parser.add_argument("--out", required=True, help="file to write; {seed} is replaced")
    args = parser.parse_args(argv)
    config = run_config(args.run)
    for seed in args.seeds:
        torch.manual_seed(seed)
        random = build_network(None, config.bundle).encoder.state_dict()
        donor, _ = read_encoder(args.donor.format(seed=seed))
        out = Path(args.out.format(seed=seed))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_encoder(hybrid(donor, random, set(args.stages)), out, encoder_options(None, config.bundle))
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
