"""``fedcontrast demo``: the whole mission on a generated multi-site phantom, in the NVFlare simulator.

1. generate a small multi-site cardiac phantom and per-site splits (1 labelled volume per site);
2. FCL pre-training of the bundle's encoder on every site's volumes (labels unused);
3. federated fine-tuning with the labelled volumes, once from the FCL encoder and once
   from random initialisation, with the same rounds and recipe;
4. the bundle's evaluation on every site's held-out test patient: a table and a plot;
5. the bundle's inference on a new, unseen scan: a segmentation NIfTI with the scan's geometry.

Everything goes under ``--workdir`` (default ``workspace/demo``); the last lines say where.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedcontrast.data.labels import ACDC_LABELS, class_names
from fedcontrast.nets.presets import network_preset

logger = logging.getLogger(__name__)

#: Bundle overrides for the demo's small volumes (about 150 mm field of view, 9 slices).
DEMO_BUNDLE: dict[str, Any] = network_preset("small")
CLASS_NAMES = tuple(class_names(ACDC_LABELS))  # the phantom's


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedcontrast demo``."""
    parser = subparsers.add_parser(
        "demo", help="FCL pre-training, federated fine-tuning, evaluation and inference on a phantom"
    )
    parser.add_argument("--workdir", type=Path, default=Path("workspace/demo"), help="where everything goes")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients-per-site", type=int, default=6)
    parser.add_argument("--pretrain-rounds", type=int, default=4)
    parser.add_argument("--finetune-rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=10, help="local epochs per fine-tuning round")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def _step(number: int, text: str) -> float:
    print(f"\n[{number}/5] {text}", flush=True)
    return time.perf_counter()


def _done(start: float, where: Path | str) -> None:
    print(f"      done in {time.perf_counter() - start:.0f} s -> {where}", flush=True)


def prepare_data(workdir: Path, sites: int, patients_per_site: int, seed: int) -> Path:
    """Generate the phantom and the per-site splits; returns the splits folder."""
    from fedcontrast.data.phantom import LABELS, synthesize_dataset
    from fedcontrast.data.readers import read_acdc
    from fedcontrast.data.splits import write_site_splits

    data_dir, splits_dir = workdir / "data", workdir / "splits"
    synthesize_dataset(data_dir, sites=sites, patients_per_site=patients_per_site, seed=seed, size="small")
    entries = read_acdc(data_dir)
    write_site_splits(entries, LABELS, splits_dir, labeled_per_site=1, test_per_site=1, seed=seed)
    return splits_dir


def run_federated(
    method: str, config: dict[str, Any], splits_dir: Path, workspace: Path, sites: int, rounds: int
) -> Path:
    """One NVFlare simulator job of ``method``; returns the folder holding its models and ledger."""
    from fedcontrast.flare.jobs import build_job, collect_results, datalist_template, run_simulator

    job = build_job(
        method, config, num_rounds=rounds, num_sites=sites, datalist=datalist_template(splits_dir)
    )
    if workspace.exists():
        shutil.rmtree(workspace)
    result_dir = run_simulator(job, workspace / "simulator", sites)
    collect_results(result_dir, workspace / "results")
    return workspace / "results"


def evaluate_model(model_path: Path, splits_dir: Path, out_dir: Path, sites: list[str]) -> dict[str, Any]:
    """The bundle's evaluation workflow on every site's test set; returns ``{site: summary}``."""
    from monai.bundle import run

    from fedcontrast.nets.bundle import config_files, default_bundle_dir

    bundle = default_bundle_dir()
    results = {}
    for site in sites:
        site_out = out_dir / site
        run(
            config_file=config_files(bundle, "evaluate"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            bundle_root=str(bundle),
            datalist=str(splits_dir / f"{site}.json"),
            val_key="test",
            ckpt_path=str(model_path),
            output_dir=str(site_out),
            num_workers=0,
            **DEMO_BUNDLE,
        )
        results[site] = json.loads((site_out / "summary.json").read_text())
    return results


def dice_by_class(summary: dict[str, Any]) -> dict[str, float]:
    """Per-class mean Dice of one site's evaluation summary, plus ``"mean"``."""
    return {name: float(summary["dice"][name]) for name in (*CLASS_NAMES, "mean")}


def write_report(results: dict[str, dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """A markdown table and a bar plot of Dice per class and initialisation; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = [*CLASS_NAMES, "mean"]
    rows = {}
    for init, per_site in results.items():
        table = np.array([[dice_by_class(s)[c] for c in columns] for s in per_site.values()])
        rows[init] = (table.mean(axis=0), table.std(axis=0))
    lines = [
        "| initialisation | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(
            f"| {init} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(*rows[init])) + " |"
            for init in rows
        ),
    ]
    table_path = out_dir / "results.md"
    table_path.write_text(
        "Dice on each site's held-out test patient (mean ± std across sites), "
        "federated fine-tuning with 1 labelled volume per site.\n\n" + "\n".join(lines) + "\n"
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(rows)
    for i, (init, (mean, std)) in enumerate(rows.items()):
        ax.bar(np.arange(len(columns)) + i * width, mean, width, yerr=std, label=init, capsize=3)
    ax.set_xticks(np.arange(len(columns)) + width * (len(rows) - 1) / 2, columns)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Federated fine-tuning, 1 label per site")
    ax.legend()
    fig.tight_layout()
    plot_path = out_dir / "dice.png"
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    print("\n" + "\n".join(lines))
    return table_path, plot_path


def infer_new_scan(model_path: Path, workdir: Path, seed: int) -> Path:
    """Generate an unseen scan, segment it with the bundle's inference workflow; returns the output NIfTI."""
    import tempfile

    import nibabel as nib
    from monai.bundle import run

    from fedcontrast.data.phantom import synthesize_dataset
    from fedcontrast.nets.bundle import config_files, default_bundle_dir

    scan_dir, out_dir = workdir / "new_scan", workdir / "inference"
    scan_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize_dataset(Path(tmp) / "new", sites=1, patients_per_site=1, seed=seed + 1000, size="small")
        image = sorted((Path(tmp) / "new").glob("site-1/patient*/*_frame01.nii.gz"))[0]
        scan = scan_dir / "new_scan.nii.gz"
        shutil.copy2(image, scan)
    bundle = default_bundle_dir()
    run(
        config_file=config_files(bundle, "inference"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        dataset_dir=str(scan_dir),
        output_dir=str(out_dir),
        ckpt_path=str(model_path),
        num_workers=0,
        **DEMO_BUNDLE,
    )
    seg = next(out_dir.glob("new_scan*.nii.gz"))
    source, result = nib.load(scan), nib.load(seg)
    same = source.shape == result.shape and bool((abs(source.affine - result.affine) < 1e-4).all())
    print(f"      {seg.name}: shape {result.shape}, same geometry as the scan: {same}")
    return seg


def run_demo(args: argparse.Namespace) -> int:
    """Run the five steps; prints progress and where everything was written."""
    from fedcontrast.data.splits import site_names

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="parsing config_file")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sites = site_names(args.sites)
    total = time.perf_counter()

    t = _step(
        1, f"phantom: {args.sites} sites x {args.patients_per_site} patients, 1 labelled volume per site"
    )
    splits_dir = prepare_data(workdir, args.sites, args.patients_per_site, args.seed)
    _done(t, splits_dir)

    t = _step(2, f"FCL pre-training in the NVFlare simulator, {args.pretrain_rounds} rounds")
    pretrain_config = {
        "bundle": DEMO_BUNDLE,
        "seed": args.seed,
        "local_epochs": 1,
        "batch_size": 4,
    }
    pretrained = run_federated(
        "fcl", pretrain_config, splits_dir, workdir / "pretrain_fcl", args.sites, args.pretrain_rounds
    )
    encoder = pretrained / "pretrained_encoder.pt"
    _done(t, encoder)

    models = {}
    for number, (init, encoder_path) in enumerate((("FCL", str(encoder)), ("random init", ""))):
        t = _step(3, f"federated fine-tuning from {init}, {args.finetune_rounds} rounds (run {number + 1}/2)")
        config = {
            "bundle": DEMO_BUNDLE,
            "pretrained_encoder": encoder_path,
            "local_epochs": args.local_epochs,
            "seed": args.seed,
        }
        folder = "finetune_" + init.replace(" ", "_").lower()
        results = run_federated(
            "supervised", config, splits_dir, workdir / folder, args.sites, args.finetune_rounds
        )
        models[init] = results / "global_model.pt"
        _done(t, models[init])

    t = _step(4, "evaluation on every site's held-out test patient (bundle evaluate config)")
    evaluations = {
        init: evaluate_model(path, splits_dir, workdir / "evaluation" / init.replace(" ", "_"), sites)
        for init, path in models.items()
    }
    (workdir / "evaluation.json").write_text(json.dumps(evaluations, indent=2))
    table, plot = write_report(evaluations, workdir)
    _done(t, f"{table}, {plot}")

    t = _step(5, "inference on a new scan (bundle inference config, FCL-initialised model)")
    segmentation = infer_new_scan(models["FCL"], workdir, args.seed)
    _done(t, segmentation)

    print(f"\nDemo finished in {(time.perf_counter() - total) / 60:.1f} min. Everything is in {workdir}:")
    for path in (splits_dir, encoder, *models.values(), table, plot, segmentation):
        print(f"  {path.relative_to(workdir)}")
    print("Bytes each site sent and received per round: pretrain_fcl/results/bytes.json")
    return 0
