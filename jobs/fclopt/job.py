"""Federated pre-training of the bundle's encoder with FCLOpt, optionally with PTNU and DP (SPEC §2).

Each site trains BYOL (online network with a predictor, EMA target network) plus a
negative-free structural matching term against the other sites' target features (or
per-partition prototypes, ``--exchange prototypes``) of the previous round. The variant
says how the target networks are kept in step:

- ``fclopt``: averaged on the server and sent both ways every round (like federated BYOL);
- ``fclopt_ptnu``: never downloaded, every site predicts it (PTNU);
- ``fclopt_ptnu_dp``: PTNU, and a site uploads its target only when its predicted distance
  exceeds ``--delta`` or every ``--sync-every`` rounds; the server sends one correction when
  its running target and the prediction drift apart by more than ``--delta`` (DP).

    python jobs/fclopt/job.py --datalist-dir SPLITS [--variant fclopt_ptnu] [--output DIR]
    python jobs/fclopt/job.py --export DIR                 # deployable job folder

Results (server): ``pretrained_encoder.pt`` (the online encoder, for ``jobs/finetune
--pretrained-encoder`` and the bundle's ``pretrained_encoder``), ``bytes.json`` (bytes per
round, site, direction and kind: weights, target, features, stats), ``metrics.json``,
``tensorboard/``.
"""

import sys

from fedcontrast.flare.jobs import add_privacy_options, job_parser, run_from_args
from fedcontrast.methods.fclopt import DEFAULTS, EXCHANGES, VARIANTS


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("fclopt", __doc__.splitlines()[0])
    parser.add_argument("--variant", default="fclopt_ptnu_dp", choices=sorted(VARIANTS))
    parser.add_argument("--exchange", default=DEFAULTS["exchange"], choices=EXCHANGES)
    parser.add_argument(
        "--delta",
        type=float,
        default=DEFAULTS["delta"],
        help="DP threshold δ on relative target distances (default %(default)s)",
    )
    parser.add_argument(
        "--sync-every",
        type=int,
        default=DEFAULTS["sync_every"],
        help="DP safety sync: every site uploads its target every T-th round (default %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    add_privacy_options(parser)
    args = parser.parse_args(argv)
    if args.local and args.variant != "fclopt":
        parser.error("--local trains each site alone, with its own target: use --variant fclopt")
    config = {
        "batch_size": args.batch_size,
        "exchange": args.exchange,
        "delta": args.delta,
        "sync_every": args.sync_every,
    }
    return run_from_args(args.variant, args, config)


if __name__ == "__main__":
    sys.exit(main())
