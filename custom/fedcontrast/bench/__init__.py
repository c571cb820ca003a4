"""``fedcontrast bench``: the label-efficiency protocol (SPEC §7) on the phantom or any supported dataset.

See :mod:`fedcontrast.bench.protocol` for what runs and :mod:`fedcontrast.bench.report` for
what is written (rows in the shared results format, a markdown report, plots). A profile
(``--profile quick|cpu|gpu``, :data:`~fedcontrast.bench.protocol.PROFILES`) sets the sizes and
budgets; options given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from fedcontrast.bench.protocol import (
    PROFILES,
    READOUTS,
    SMALL_BUNDLE,
    VALIDATION_SCOPES,
    BenchConfig,
    check_method,
    run_benchmark,
)
from fedcontrast.data.phantom import DIFFICULTIES

#: Command-line options that override a profile's setting of the same name.
OVERRIDES = (
    "methods",
    "budgets",
    "seeds",
    "sites",
    "patients_per_site",
    "data_seed",
    "pretrain_steps",
    "pretrain_rounds",
    "finetune_steps",
    "finetune_checkpoints",
    "finetune_lr",
    "finetune_encoder_lr_scale",
    "finetune_encoder_warmup_steps",
    "readouts",
    "size",
    "difficulty",
    "cine",
    "pretrain_overrides",
    "validation",
)


def json_object(text: str) -> dict:
    """``text`` parsed as a JSON object (the type of ``--pretrain-overrides`` and ``--bundle-overrides``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"lr\": 3e-3}}', got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedcontrast bench``."""
    parser = subparsers.add_parser("bench", help="label-efficiency comparison of the methods (SPEC §7)")
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="cpu",
        help="cpu: the full grid on a 2-core CPU in one session; gpu: realistic budgets; quick: CI",
    )
    parser.add_argument("--quick", action="store_true", help="same as --profile quick (minutes)")
    parser.add_argument(
        "--methods",
        nargs="+",
        help="default: random_init and every registered pre-training method; <method>+decoder adds "
        "the local decoder stage on that method's encoders (e.g. fcl+decoder); supervised_ceiling "
        "pre-trains with every pre-training volume's label (a diagnostic bound, not a method), and "
        "supervised_ceiling_{cavities,myocardium,heart} with fewer, merged classes",
    )
    parser.add_argument("--budgets", nargs="+", type=int, help="labelled volumes per site (default 1 2 4 8)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run seeds (default 0 1 2 3 4)")
    parser.add_argument("--sites", type=int, help="phantom sites, or sites to deal a one-site dataset to")
    parser.add_argument("--patients-per-site", type=int, help="phantom patients per site")
    parser.add_argument("--data-seed", type=int, help="seed of the phantom and of the split (default 0)")
    parser.add_argument("--size", help="phantom size preset")
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), help="phantom difficulty preset")
    parser.add_argument(
        "--cine",
        action="store_true",
        default=None,
        help="the phantom also writes each patient's cine series, which fedmotion's masks come from",
    )
    parser.add_argument("--pretrain-steps", type=int, help="pre-training optimiser steps per site")
    parser.add_argument("--pretrain-rounds", type=int, help="rounds the pre-training steps are split into")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning optimiser steps, every N alike")
    parser.add_argument(
        "--finetune-checkpoints", type=int, help="scored checkpoints (= FedAvg rounds) over those steps"
    )
    parser.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (AdamW), every N alike")
    parser.add_argument(
        "--finetune-encoder-lr-scale",
        type=float,
        help="the encoder's fine-tuning learning rate as a fraction of --finetune-lr (probe: unused)",
    )
    parser.add_argument(
        "--finetune-encoder-warmup-steps",
        type=int,
        help="fine-tuning steps per site in which only the decoder trains before the encoder joins "
        "(probe: unused)",
    )
    parser.add_argument("--readouts", nargs="+", choices=READOUTS, help="finetune and/or probe")
    parser.add_argument(
        "--pretrain-overrides",
        type=json_object,
        help="JSON merged over every pre-training method's config, e.g. '{\"lr\": 3e-3}'",
    )
    parser.add_argument(
        "--bundle-overrides",
        type=json_object,
        help="JSON merged over the profile's bundle settings (the network every method trains), "
        "e.g. '{\"init_filters\": 16}'",
    )
    parser.add_argument(
        "--validation",
        choices=VALIDATION_SCOPES,
        help="methods also scored on the validation patients (default random_init; all: to tune on them)",
    )
    parser.add_argument("--dataset", type=Path, help="a dataset folder instead of the phantom")
    parser.add_argument("--format", default="acdc", choices=["acdc", "mnms", "decathlon"])
    parser.add_argument(
        "--run-budgets",
        nargs="+",
        type=int,
        help="run only these budgets' units now (not a setting: a later call runs the rest)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--out", type=Path, default=Path("workspace/bench"), help="run folder (resumable)")
    parser.add_argument(
        "--report", type=Path, help="where the report, result JSON and plots go (default: the run folder)"
    )
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The profile's settings with the command line's options over them."""
    settings = dict(PROFILES["quick" if args.quick else args.profile])
    settings.update({name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None})
    if args.bundle_overrides:
        settings["bundle"] = {**settings.get("bundle", SMALL_BUNDLE), **args.bundle_overrides}
    return BenchConfig(**settings)


def run(args: argparse.Namespace) -> int:
    """Run or resume the benchmark, then write its report."""
    config = config_from_args(args)
    for method in config.methods:
        check_method(method)  # a clear error for an unknown name, before any work
    rows = run_benchmark(config, args.out, args.workers, args.dataset, args.format, args.run_budgets)
    from fedcontrast.bench.report import write_report

    saved = json.loads((args.out / "bench_config.json").read_text())  # every method and seed run so far
    report = write_report(rows, SimpleNamespace(**saved), args.out, args.report or args.out)
    print(f"{len(rows)} rows in {args.out / 'rows.jsonl'}; report: {report}")
    return 0
