"""Training throughput of one site: pre-training and fine-tuning samples per second, CPU or GPU.

One site's trainers (``fedcontrast.methods``: the same classes the NVFlare executor drives) run
on a phantom site, on the selected device: every pre-training method given (default FCL and
FCLOpt+PTNU+DP) and ``supervised`` fine-tuning through the bundle. After one warm-up round
(built caches, cuDNN autotuning), ``--rounds`` rounds are timed (on CUDA with a device
synchronisation on both ends); samples/s = samples the trainer reports (slices/slabs for
pre-training, volume patches for fine-tuning) / seconds. Pre-training uses ``amp`` as given
(default bf16, which is off on the CPU); the bundle's fine-tuning uses AMP exactly on CUDA.
``scoring`` times the bench's :class:`~fedcontrast.bench.evaluate.BundleScorer` on the same
device: BatchNorm re-estimation on one training volume, then inference and Dice/HD95 on two
(seconds per scored volume, the fine-tuned model's). ``data_seconds_per_step`` of fine-tuning
times the bundle's train data loader alone for the same rounds (its transforms run on the CPU in
the training process, ``num_workers`` 0 as in the bench): the share of a fine-tuning step that
moving the augmentation to the device or to loader workers could save.

    python benchmarks/throughput.py [--device cuda] [--profile cpu|gpu] [--tiny]
        [--out benchmarks/results/throughput.json]

``--profile`` takes the network, the phantom size and the pre-training batch of that bench
profile (``fedcontrast.bench.protocol.PROFILES``; default cpu). ``--tiny`` shrinks network and
data to what the test suite runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedcontrast.bench.environment import environment
from fedcontrast.bench.evaluate import BundleScorer
from fedcontrast.bench.protocol import PROFILES, BenchConfig
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import LABELS, synthesize_dataset
from fedcontrast.data.readers import read_acdc
from fedcontrast.data.splits import write_site_splits
from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.device import resolve_device
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.supervised import SupervisedBundleTrainer, supervised_entries, untracked_meta
from fedcontrast.methods.volumes import pretraining_entries
from fedcontrast.nets.presets import network_preset

#: A tiny network for tests.
TINY = {"spatial_dims": 2, **network_preset("tiny", roi_size=[32, 32], patch_size=[32, 32, 8])}
TINY_PRETRAIN = {"head_hidden": 16, "predictor_hidden": 16, "embedding_dim": 16, "features_per_partition": 2}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    method: str, config: dict[str, Any], entries: list[dict], device: torch.device, rounds: int
) -> tuple[dict[str, Any], Any, Any]:
    """Build ``method``'s trainer on ``entries``, run one warm-up round, time ``rounds`` more.

    The site talks to the method's own server strategy (as alone in a federation), so every
    round gets what the protocol sends; only ``local_round`` is timed. Returns the timing, the
    last round's update and the trainer.
    """
    spec = get_method(method)
    strategy = spec.strategy(config, spec.trainer.initial_message(config))
    trainer = spec.trainer(config, entries, "site-1", str(device))
    samples, seconds = 0, 0.0
    for round_num in range(rounds + 1):
        incoming = strategy.message_for("site-1", round_num)
        synchronize(device)
        start = time.perf_counter()
        update = trainer.local_round(incoming, round_num)
        synchronize(device)
        if round_num > 0:  # round 0 warms up
            seconds += time.perf_counter() - start
            samples += update.num_samples
        strategy.aggregate({"site-1": update}, round_num)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    timing = {
        "samples_per_s": samples / seconds,
        "seconds_per_round": seconds / rounds,
        "samples_per_round": samples / rounds,
        "peak_gpu_mb": peak,
    }
    return timing, update, trainer


def time_data_loading(trainer: SupervisedBundleTrainer, rounds: int) -> dict[str, float]:
    """Seconds per batch of the fine-tuning trainer's data loader alone (its transforms, no
    network): one warm-up pass, then ``rounds`` passes, as :func:`time_rounds` runs them."""
    loader = trainer.workflow.parser.get_parsed_content("train#dataloader")
    batches = 0
    with untracked_meta():
        for _ in loader:
            pass
        start = time.perf_counter()
        for _ in range(rounds):
            batches += sum(1 for _ in loader)
    return {
        "data_seconds_per_step": (time.perf_counter() - start) / batches,
        "steps_per_round": batches / rounds,
    }


def time_scoring(
    bundle: dict[str, Any],
    labelled: list[dict],
    state: dict[str, torch.Tensor],
    device: torch.device,
    rounds: int,
) -> dict[str, Any]:
    """Seconds per scored volume of the bench's scorer on ``device``: BatchNorm re-estimated on the
    first labelled volume, then the first two scored (one warm-up call, ``rounds`` timed)."""
    scorer = BundleScorer(
        {"site-1": labelled[:2]}, bundle, calibration_sets={"site-1": labelled[:1]}, device=device
    )
    scorer.score(state, "site-1")
    synchronize(device)
    start = time.perf_counter()
    for _ in range(rounds):
        scorer.score(state, "site-1")
    synchronize(device)
    seconds = (time.perf_counter() - start) / rounds
    return {
        "seconds_per_volume": seconds / len(scorer.volumes["site-1"]),
        "volumes": len(scorer.volumes["site-1"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", choices=["cpu", "gpu"], default="cpu", help="bench profile's sizes")
    parser.add_argument("--amp", default="bf16", help="pre-training autocast: bf16, fp16 or off")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["fcl", "fclopt_ptnu_dp"],
        help="pre-training methods (none: fine-tuning only)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--patients", type=int, default=6, help="phantom patients of the site")
    parser.add_argument(
        "--batch-size", type=int, help="pre-training volumes per batch (default: the profile's)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="tiny network and data (tests)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = BenchConfig(**PROFILES[args.profile])
    bundle = TINY if args.tiny else profile.bundle
    size = "small" if args.tiny else profile.size
    patients = 2 if args.tiny else args.patients
    pretrain = {
        "bundle": bundle,
        "batch_size": args.batch_size or profile.batch_size,
        "amp": args.amp,
        "seed": 0,
        **(TINY_PRETRAIN if args.tiny else {}),
    }
    finetune = {"bundle": bundle, "local_epochs": 1, "seed": 0, "num_workers": 0}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_dataset(root / "data", sites=1, patients_per_site=patients, seed=0, size=size)
        write_site_splits(read_acdc(root / "data"), LABELS, root / "splits", patients, 0, seed=0)
        datalist = load_site_datalist(root / "splits" / "site-1.json")
        results: dict[str, Any] = {"pretraining": {}, "finetuning": {}}
        for method in args.methods:
            entries = pretraining_entries(datalist)
            results["pretraining"][method], _, _ = time_rounds(method, pretrain, entries, device, args.rounds)
        labelled = supervised_entries(datalist)
        finetune["workdir"] = str(root / "work")
        timed, update, trainer = time_rounds("supervised", finetune, labelled, device, args.rounds)
        data = time_data_loading(trainer, args.rounds)
        step = timed["seconds_per_round"] / data["steps_per_round"]
        results["finetuning"]["supervised"] = {**timed, "seconds_per_step": step, **data}
        state = message_to_state_dict(update.message)
        results["scoring"] = time_scoring(bundle, labelled, state, device, args.rounds)
    result = {
        "what": "samples per second of one site's trainers (one warm-up round, then timed rounds)",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none: CPU run",
        "amp": {"pretraining": args.amp if device.type == "cuda" else "off (CPU)", "finetuning": "bundle"},
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": {"start": load_at_start, "end": os.getloadavg(), "cpus": os.cpu_count()},
        "config": {
            "profile": args.profile,
            "size": size,
            "bundle": bundle,
            "patients": patients,
            "rounds": args.rounds,
            "pretraining": pretrain,
        },
        "environment": environment(),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
