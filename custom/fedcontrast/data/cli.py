"""``fedcontrast data``: generate the phantom, split datasets into site datalists, check datalists,
write the motion masks FedMotion would train on."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import DIFFICULTIES, SIZES, synthesize_dataset
from fedcontrast.data.readers import FORMATS, read_dataset
from fedcontrast.data.splits import write_site_splits

logger = logging.getLogger(__name__)

#: Sub-folder of ``split --out`` where M&Ms ED/ES frames are extracted.
MNMS_CACHE = "mnms_frames"

SPLIT_HELP = """\
Write one Decathlon-style datalist per site (OUT/site-k.json) and OUT/index.json.
Sites are renamed site-1..site-K. Per site: a test set of T patients (all their volumes),
fixed for a seed whatever N; N labelled training volumes (a volume is one 3D frame, ED or
ES; the first N of a seeded order that takes every training patient's ED before any ES,
so labelled sets are nested across N); every other training volume unlabelled. No patient
is in both training and test."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedcontrast data {synth,split,check,motion-masks}``."""
    data = subparsers.add_parser(
        "data", help="phantom generation, dataset splits, datalist checks, motion masks"
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = commands.add_parser(
        "synth",
        help="generate a multi-site cardiac MRI phantom in the ACDC layout",
        description="Generate OUT/site-k/patientXXX/{Info.cfg, *_frameYY.nii.gz, *_frameYY_gt.nii.gz}.",
    )
    synth.add_argument(
        "--out", type=Path, required=True, help="output folder (new, empty or a previous phantom)"
    )
    synth.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    synth.add_argument("--patients-per-site", type=int, default=10, help="patients per site, 2 volumes each")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="small ~48x48x8, small_fine the same at half the pixel size, full ~200x200x10",
    )
    synth.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTIES),
        default="standard",
        help="patient and site variability: standard (tests, demo) or realistic (label-efficiency bench)",
    )
    synth.add_argument(
        "--same-sequence", action="store_true", help="no gradient-echo site (default: the last of >=3 sites)"
    )
    synth.add_argument(
        "--cine", action="store_true", help="also each patient's whole cine series (patientXXX_4d.nii.gz)"
    )
    synth.set_defaults(func=run_synth)

    split = commands.add_parser(
        "split", help="per-site datalists (test / labelled / unlabelled)", description=SPLIT_HELP
    )
    split.add_argument(
        "--dataset", type=Path, required=True, help="dataset folder (Decathlon: or its dataset.json)"
    )
    split.add_argument("--format", choices=FORMATS, required=True, dest="fmt")
    split.add_argument("--out", type=Path, required=True, help="output folder for site datalists")
    sites = split.add_mutually_exclusive_group()
    sites.add_argument("--sites", type=int, help="deal the patients of a single-site dataset to K sites")
    sites.add_argument(
        "--site-key", help="what names a site: M&Ms 'vendor' (default) or 'centre'; Decathlon: an item key"
    )
    split.add_argument(
        "--site", help="name of a single-site ACDC/Decathlon dataset (default: its folder name)"
    )
    split.add_argument(
        "--labeled-per-site", type=int, required=True, metavar="N", help="labelled training VOLUMES per site"
    )
    split.add_argument("--test-per-site", type=int, required=True, metavar="T", help="test PATIENTS per site")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--allow-unlabeled", action="store_true", help="ACDC: accept volumes without _gt file")
    split.add_argument(
        "--unlabelled-key",
        action="append",
        metavar="KEY",
        help="Decathlon: a dataset.json list of unlabelled pre-training images (repeatable; default: test)",
    )
    split.add_argument(
        "--missing-site",
        metavar="SITE",
        help="Decathlon with --site-key: the site of items without that key (default: refuse them)",
    )
    split.add_argument(
        "--no-value-check",
        action="store_true",
        help="skip reading voxels (label values, finite images): headers only",
    )
    split.set_defaults(func=run_split)

    check = commands.add_parser("check", help="validate site datalists and the files they reference")
    check.add_argument("datalists", type=Path, nargs="+", help="site datalist JSON files")
    check.add_argument(
        "--values",
        action="store_true",
        help="also read every voxel: label values, finite and complete images",
    )
    check.set_defaults(func=run_check)

    masks = commands.add_parser(
        "motion-masks",
        help="write the per-patient motion masks fedmotion trains on, to look at before a run",
    )
    masks.add_argument("datalist", type=Path, help="a site datalist (its training and unlabeled lists)")
    masks.add_argument("--out", type=Path, required=True, help="folder for <patient>.nii.gz masks")
    masks.add_argument("--smooth-mm", type=float, help="in-plane smoothing of the motion map, mm (default 6)")
    masks.add_argument(
        "--phase-bins",
        type=int,
        help="average a cine series into this many phases first (default 6, fedmotion's; 0: every frame)",
    )
    masks.set_defaults(func=run_motion_masks)


def run_synth(args: argparse.Namespace) -> int:
    """Generate the phantom and print its summary."""
    summary = synthesize_dataset(
        args.out,
        sites=args.sites,
        patients_per_site=args.patients_per_site,
        seed=args.seed,
        size=args.size,
        other_sequence=not args.same_sequence,
        difficulty=args.difficulty,
        cine=args.cine,
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_split(args: argparse.Namespace) -> int:
    """Read the dataset, validate it, write the site datalists and print the index."""
    entries, labels = read_dataset(
        args.dataset,
        args.fmt,
        site=args.site,
        site_key=args.site_key,
        cache_dir=args.out / MNMS_CACHE if args.fmt == "mnms" else None,
        allow_unlabeled=args.allow_unlabeled,
        unlabelled_keys=args.unlabelled_key or ("test",),
        missing_site=args.missing_site,
    )
    logger.info("read %d volumes from %s", len(entries), args.dataset)
    index = write_site_splits(
        entries,
        labels,
        args.out,
        labeled_per_site=args.labeled_per_site,
        test_per_site=args.test_per_site,
        seed=args.seed,
        sites=args.sites,
        check_values=not args.no_value_check,
        provenance={"dataset": str(args.dataset.resolve()), "format": args.fmt},
    )
    print(json.dumps(index, indent=2))
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Validate each site datalist; print one line per file."""
    for path in args.datalists:
        datalist = load_site_datalist(path, check_files=True, check_values=args.values)
        counts = ", ".join(f"{part} {len(datalist[part])}" for part in ("training", "unlabeled", "test"))
        print(f"{path}: site {datalist['site']}: {counts}: OK")
    return 0


def run_motion_masks(args: argparse.Namespace) -> int:
    """Write one site's motion masks as fedmotion makes them; print each mask with its moving fraction."""
    import nibabel as nib
    import numpy as np

    from fedcontrast.methods.fedmotion import motion_entries
    from fedcontrast.methods.volumes import pretraining_entries

    datalist = load_site_datalist(args.datalist)
    given = {"smooth_mm": args.smooth_mm, "phase_bins": args.phase_bins}
    entries, site = pretraining_entries(datalist), str(datalist["site"])
    labelled = motion_entries(entries, site, args.out, **{k: v for k, v in given.items() if v is not None})
    for mask in sorted({e["label"] for e in labelled}):
        print(f"{mask}: moving {float(np.asarray(nib.load(mask).dataobj).mean()):.3f}")
    return 0
