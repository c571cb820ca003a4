"""FedCRLD: supervised federated segmentation across heterogeneous sites, one model per site.

Each site trains the bundle's FedCRLD network (shared encoder, private encoder and decoder,
cross-attention re-localisation, momentum distillation; method ``fedcrld``) on its labelled
volumes and validates every round on its ``test`` list; the server averages the shared
encoder only. The private encoder and the decoder never leave a site.

    python jobs/fedcrld/job.py --datalist-dir SPLITS [--pretrained-encoder ENC.pt] [--output DIR]
    python jobs/fedcrld/job.py --export DIR            # deployable job folder

Results: each site writes its own model, ``<site run folder>/fedcontrast/<site>/site_model.pt``
(in the simulator ``WS/<site>/simulate_job/...``; copied to ``--output/sites/<site>/site_model.pt``);
the server writes ``bytes.json``, ``metrics.json``, ``tensorboard/`` (no global network: it
holds only the shared encoder).
"""

import shutil
import sys
from pathlib import Path

from fedcontrast.data.splits import site_names
from fedcontrast.flare.executor import LOCAL_OUTPUT_DIR
from fedcontrast.flare.jobs import job_parser, run_from_args
from fedcontrast.methods.fedcrld import AGGREGATIONS, DEFAULTS, SITE_MODEL_FILE
from fedcontrast.methods.losses import MI_FORMS

METHOD = "fedcrld"
#: Where the simulator's site ``<site>`` keeps its run folder, under the workspace.
SITE_RUN_DIR = "{site}/simulate_job"


def site_models(workspace: Path, sites: list[str]) -> dict[str, Path]:
    """Each simulated site's ``site_model.pt`` in its own run folder; a missing one is an error."""
    found = {
        site: workspace / SITE_RUN_DIR.format(site=site) / LOCAL_OUTPUT_DIR / site / SITE_MODEL_FILE
        for site in sites
    }
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"site model(s) not written: {missing}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(METHOD, __doc__.splitlines()[0])
    parser.add_argument("--pretrained-encoder", type=Path, help="encoder checkpoint for the shared encoder")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--validation-key", default="test", help="site datalist list validated every round")
    parser.add_argument("--mi-form", choices=MI_FORMS, default=DEFAULTS["mi_form"])
    parser.add_argument("--mi-weight", type=float, default=DEFAULTS["mi_weight"])
    parser.add_argument("--history-momentum", type=float, default=DEFAULTS["history_momentum"])
    parser.add_argument("--distill-weight", type=float, default=DEFAULTS["distill_weight"])
    parser.add_argument("--feature-weight", type=float, default=DEFAULTS["feature_weight"])
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default=DEFAULTS["aggregation"])
    args = parser.parse_args(argv)
    config = {
        "lr": args.lr,
        "batch_size": args.batch_size,
        "pretrained_encoder": str(args.pretrained_encoder.resolve()) if args.pretrained_encoder else "",
        "mi_form": args.mi_form,
        "mi_weight": args.mi_weight,
        "history_momentum": args.history_momentum,
        "distill_weight": args.distill_weight,
        "feature_weight": args.feature_weight,
        "aggregation": args.aggregation,
    }
    code = run_from_args(METHOD, args, config, validation_key=args.validation_key)
    if code or args.export:
        return code
    for site, path in site_models(args.workspace.resolve(), site_names(args.sites)).items():
        if args.output:
            dest = args.output / "sites" / site / SITE_MODEL_FILE
            dest.parent.mkdir(parents=True, exist_ok=True)
            path = Path(shutil.copy2(path, dest))
        print(f"  {site}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
