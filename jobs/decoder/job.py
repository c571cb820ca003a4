"""Local contrastive pre-training of the decoder on a frozen pre-trained encoder (stage 2 of 3).

The second stage of global -> local -> fine-tune (Chaitanya et al.; SPEC §4): every site
loads the encoder file of any pre-training job (``jobs/fcl/job.py --method ...``), freezes
it and trains the first decoder blocks with the local contrastive loss (L^R or L^D) on its
unlabelled and labelled images (labels ignored). Federated: the server averages the decoder
blocks (FedAvg); ``--local``: each site alone (then ``--pretrained-encoder`` may name per-site
files with ``{site}``).

    python jobs/decoder/job.py --datalist-dir SPLITS --pretrained-encoder OUT_FCL/pretrained_encoder.pt \\
        [--loss L^D] [--decoder-levels K] [--local] [--output DIR]
    python jobs/decoder/job.py --pretrained-encoder /site/path/enc.pt --export DIR

Results (server): ``pretrained_decoder.pt`` (encoder + decoder blocks, self-describing; pass it
to ``jobs/finetune/job.py --pretrained-decoder`` or the bundle's ``pretrained_decoder``),
``bytes.json``, ``metrics.json``, ``tensorboard/``; with ``--local``, ``local/<site>/pretrained_decoder.pt``.
"""

import sys

from fedcontrast.flare.jobs import job_parser, run_from_args
from fedcontrast.methods.losses import LOCAL_STRATEGIES

METHOD = "local_decoder"


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("decoder", __doc__.splitlines()[0])
    parser.add_argument(
        "--pretrained-encoder",
        required=True,
        help="encoder file of a pre-training job, as the sites see it ({site}: per-site files, --local only)",
    )
    parser.add_argument("--encoder-method", default="", help="the method that pre-trained it (provenance)")
    parser.add_argument("--loss", default="L^R", choices=LOCAL_STRATEGIES, help="local contrastive strategy")
    parser.add_argument(
        "--decoder-levels", type=int, help="up-sampling levels to pre-train (default: all but the last)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    encoder = args.pretrained_encoder
    if not args.export and "{site}" not in encoder:
        from pathlib import Path

        encoder = str(Path(encoder).resolve())
    config = {
        "pretrained_encoder": encoder,
        "encoder_method": args.encoder_method,
        "loss_strategy": args.loss,
        "decoder_levels": args.decoder_levels,
        "batch_size": args.batch_size,
    }
    return run_from_args(
        METHOD, args, config, name="decoder", datalist_keys=("training", "unlabeled"), validation_key=""
    )


if __name__ == "__main__":
    sys.exit(main())
