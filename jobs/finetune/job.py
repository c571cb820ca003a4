"""Federated fine-tuning of the bundle's segmentation network (FedAvg), or local fine-tuning.

Each site trains the bundle network through the bundle's own train workflow on its
labelled volumes (the ``supervised`` method), validating every round on its ``test``
list; the server averages the weights. ``--local`` runs the same job without
averaging: every site fine-tunes its own model.

    python jobs/finetune/job.py --datalist-dir SPLITS [--pretrained-encoder ENC.pt] [--output DIR]
    python jobs/finetune/job.py --export DIR            # deployable job folder

Results (server): ``global_model.pt`` (for the bundle's ``--ckpt_path``), ``bytes.json``,
``metrics.json``, ``tensorboard/``; with ``--local``, ``local/<site>/global_model.pt``.
"""

import sys
from pathlib import Path

from fedcontrast.flare.jobs import build_job, datalist_template, job_parser, read_config, run_or_export

METHOD = "supervised"


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("finetune", __doc__.splitlines()[0])
    parser.add_argument("--pretrained-encoder", type=Path, help="encoder checkpoint to start from")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--validation-key", default="test", help="site datalist list validated every round")
    args = parser.parse_args(argv)
    config = {
        "local_epochs": args.local_epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "pretrained_encoder": str(args.pretrained_encoder.resolve()) if args.pretrained_encoder else "",
        **read_config(args.config),
    }
    job = build_job(
        METHOD,
        config,
        num_rounds=args.rounds,
        num_sites=args.sites,
        datalist=datalist_template(args.datalist_dir),
        name="finetune_local" if args.local else "finetune",
        validation_key=args.validation_key,
        min_volumes=args.min_volumes,
        federated=not args.local,
        record_messages=args.record_messages,
    )
    return run_or_export(job, args)


if __name__ == "__main__":
    sys.exit(main())
