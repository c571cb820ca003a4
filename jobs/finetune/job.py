"""Federated fine-tuning of the bundle's segmentation network (FedAvg), or local fine-tuning.

Each site trains the bundle network through the bundle's own train workflow on its
labelled volumes (the ``supervised`` method), validating every round on its ``test``
list; the server averages the weights. ``--local`` runs the same job without
averaging: every site fine-tunes its own model.

    python jobs/finetune/job.py --datalist-dir SPLITS [--pretrained-encoder ENC.pt] [--output DIR]
    python jobs/finetune/job.py --datalist-dir SPLITS --pretrained-decoder DEC.pt  # encoder + decoder
    python jobs/finetune/job.py --datalist-dir SPLITS --pretrained-encoder ENC.pt --encoder-lr-scale 0.3
    python jobs/finetune/job.py --datalist-dir SPLITS --pretrained-encoder ENC.pt --encoder-warmup-steps 48
    python jobs/finetune/job.py --export DIR            # deployable job folder

Results (server): ``global_model.pt`` (for the bundle's ``--ckpt_path``), ``bytes.json``,
``metrics.json``, ``tensorboard/``; with ``--local``, ``local/<site>/global_model.pt``.
"""

import sys
from pathlib import Path

from fedcontrast.flare.jobs import job_parser, run_from_args

METHOD = "supervised"


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("finetune", __doc__.splitlines()[0])
    parser.add_argument("--pretrained-encoder", type=Path, help="encoder checkpoint to start from")
    parser.add_argument(
        "--pretrained-decoder",
        type=Path,
        help="decoder-stage checkpoint (jobs/decoder): its encoder and decoder blocks are loaded",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--encoder-lr-scale",
        type=float,
        default=1.0,
        help="the encoder's learning rate as a fraction of --lr (the bundle's encoder_lr_scale); "
        "below 1 keeps more of a pre-trained encoder",
    )
    parser.add_argument(
        "--encoder-warmup-steps",
        type=int,
        default=0,
        help="optimiser steps per site in which only the decoder trains before the encoder joins "
        "(the bundle's encoder_warmup_iterations)",
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--validation-key", default="test", help="site datalist list validated every round")
    args = parser.parse_args(argv)
    config = {
        "lr": args.lr,
        "batch_size": args.batch_size,
        "bundle": {
            "encoder_lr_scale": args.encoder_lr_scale,
            "encoder_warmup_iterations": args.encoder_warmup_steps,
        },
        "pretrained_encoder": str(args.pretrained_encoder.resolve()) if args.pretrained_encoder else "",
        "pretrained_decoder": str(args.pretrained_decoder.resolve()) if args.pretrained_decoder else "",
    }
    return run_from_args(METHOD, args, config, name="finetune", validation_key=args.validation_key)


if __name__ == "__main__":
    sys.exit(main())
