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

from fedcontrast.flare.jobs import add_privacy_options, job_parser, run_from_args
from fedcontrast.methods.registry import available_methods


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("fcl", __doc__.splitlines()[0])
    parser.add_argument("--method", default="fcl", choices=available_methods(pretraining=True))
    parser.add_argument("--batch-size", type=int, default=4)
    add_privacy_options(parser)
    args = parser.parse_args(argv)
    return run_from_args(args.method, args, {"batch_size": args.batch_size})


if __name__ == "__main__":
    sys.exit(main())
