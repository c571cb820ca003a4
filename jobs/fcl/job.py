"""Federated contrastive pre-training of the bundle's encoder: FCL (or another pre-training method).

Each site trains the encoder with a projection head on its unlabelled and labelled
images (labels ignored); the server averages the weights and gives every site the
other sites' 128-d features of the previous round. An optional privacy filter clips
and noises each feature before it leaves its site (off by default).

    python jobs/fcl/job.py --datalist-dir SPLITS [--feature-clip C --feature-noise SIGMA] [--output DIR]
    python jobs/fcl/job.py --export DIR                 # deployable job folder

Results (server): ``pretrained_encoder.pt`` (for ``jobs/finetune --pretrained-encoder`` and the
bundle's ``pretrained_encoder``), ``bytes.json``, ``metrics.json``, ``tensorboard/``.
"""

import sys

from fedcontrast.flare.jobs import build_job, datalist_template, job_parser, read_config, run_or_export
from fedcontrast.methods.registry import available_methods


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("fcl", __doc__.splitlines()[0])
    parser.add_argument("--method", default="fcl", choices=available_methods(pretraining=True))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--feature-clip", type=float, default=0.0, help="clip each feature to this norm")
    parser.add_argument("--feature-noise", type=float, default=0.0, help="Gaussian noise std on features")
    args = parser.parse_args(argv)
    config = {
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        **read_config(args.config),
    }
    job = build_job(
        args.method,
        config,
        num_rounds=args.rounds,
        num_sites=args.sites,
        datalist=datalist_template(args.datalist_dir),
        name=f"{args.method}_local" if args.local else args.method,
        min_volumes=args.min_volumes,
        federated=not args.local,
        feature_clip=args.feature_clip,
        feature_noise=args.feature_noise,
        record_messages=args.record_messages,
    )
    return run_or_export(job, args)


if __name__ == "__main__":
    sys.exit(main())
