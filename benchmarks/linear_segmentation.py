"""How much of the segmentation does each encoder stage hold? A per-pixel linear probe per stage.

Linear CKA with the supervised ceiling's encoder (``encoder_similarity.py``) shows that
pre-training moves an encoder's features, not whether a decoder can use them. This asks the
second question directly, stage by stage: each stage's feature map, up-sampled (bilinear) to
the slice's pixels, is the input of a multinomial logistic regression that predicts a
pixel's label (background, RV, MYO, LV; classes weighted by their inverse frequency). The
probe is fitted leave-one-patient-out on the run's **validation** patients of every site
(never used in pre-training, fine-tuning or the headline) and scored by the held-out patient's
mean Dice over RV, MYO and LV, averaged over patients. ``pixels`` (the image intensity alone)
is the floor; the random encoder (the run seed's initialisation) is what pre-training starts
from.

    python benchmarks/linear_segmentation.py --run workspace/grid90 --seeds 0 1 2 3 4 \
        --encoders 'supervised_ceiling=workspace/grid90/pretrain/supervised_ceiling_s{seed}/global.pt' \
        'fcl=workspace/grid90/pretrain/fcl_s{seed}/global.pt' \
        --out benchmarks/results/label_efficiency_ablations/dense/linear_segmentation

writes ``linear_segmentation.json`` (per seed and the summary) and ``.md`` (the summary table).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from partition_signal import encoder_parser, load_encoders, run_config
from torch.nn import functional as F

from fedcontrast.bench.environment import environment
from fedcontrast.bench.protocol import BenchConfig
from fedcontrast.bench.report import output_file
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.nets.bundle import bundle_parser

#: Optimiser steps (L-BFGS) of each probe fit.
FIT_STEPS = 50
#: Pixels drawn at random (seeded) from the other patients to fit each probe.
FIT_PIXELS = 40_000


def validation_patients(run: Path, bundle: dict) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{patient: [(slices (Z, 1, H, W), labels (Z, H, W)), ...]}``: every validation volume of the
    run's sites, preprocessed by the bundle (a patient's ED and ES frames under one key)."""
    preprocessing = bundle_parser(None, "train", bundle).get_parsed_content("preprocessing")
    patients: dict[str, list] = {}
    for path in sorted((run / "splits" / "N1").glob("site-*.json")):
        for entry in load_site_datalist(path)["validation"]:
            volume = preprocessing({"image": entry["image"], "label": entry["label"]})
            image = volume["image"].as_tensor().permute(3, 0, 1, 2).float()  # (Z, C, H, W)
            label = volume["label"].as_tensor()[0].permute(2, 0, 1).long()  # (Z, H, W)
            patients.setdefault(f"{path.stem}/{entry['patient']}", []).append((image, label))
    return patients


def stage_pixels(encoder: torch.nn.Module | None, images: torch.Tensor) -> list[torch.Tensor]:
    """Per encoder stage, ``(Z*H*W, C')`` features of every pixel (the map up-sampled bilinearly);
    for ``encoder`` None, the one "stage" of the intensities."""
    if encoder is None:
        return [images.movedim(1, -1).reshape(-1, images.shape[1])]
    encoder.eval()
    with torch.no_grad():
        maps = encoder(images)
    size = images.shape[2:]
    return [
        F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        .movedim(1, -1)
        .reshape(-1, m.shape[1])
        for m in maps
    ]


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.nn.Linear:
    """Class-balanced multinomial logistic regression (L-BFGS) on standardised ``(n, C)`` features."""
    probe = torch.nn.Linear(features.shape[1], classes).double()
    counts = torch.bincount(labels, minlength=classes).double()
    weight = counts.sum() / (classes * counts.clamp_min(1))
    optimiser = torch.optim.LBFGS(probe.parameters(), max_iter=FIT_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(features), labels, weight=weight) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return probe


def mean_dice(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Mean Dice over the foreground classes ``1 .. classes-1`` of ``(n,)`` pixel labels (MONAI's
    ``compute_dice``; a class absent from both counts 1)."""
    one_hot = [F.one_hot(x.long(), classes).T[None].float() for x in (predicted, labels)]  # (1, C, n)
    return float(compute_dice(*one_hot, include_background=False, ignore_empty=False).mean())


def leave_one_patient_out(
    features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], seed: int
) -> float:
    """Mean over patients of the held-out patient's mean Dice, the probe fitted on
    :data:`FIT_PIXELS` pixels of the others (the same pixels for every encoder and stage)."""
    classes = int(max(int(v.max()) for v in labels.values())) + 1
    scores = []
    for i, held in enumerate(features):
        x = torch.cat([features[p] for p in features if p != held])
        y = torch.cat([labels[p] for p in labels if p != held])
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        drawn = torch.randperm(len(y), generator=generator)[:FIT_PIXELS]
        x, y = x[drawn].double(), y[drawn]
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        probe = fit_probe((x - mean) / std, y, classes)
        with torch.no_grad():
            predicted = probe((features[held].double() - mean) / std).argmax(1)
        scores.append(mean_dice(predicted, labels[held], classes))
    return float(np.mean(scores))


def seed_results(config: BenchConfig, patients: dict, specs: list[str], seed: int) -> dict[str, list[float]]:
    """``{encoder: [Dice per stage]}`` for ``pixels``, the random encoder of ``seed`` and each
    ``NAME=PATH`` (``{seed}`` in PATH replaced; a missing file is left out, with a note)."""
    labels = {p: torch.cat([label.flatten() for _, label in vols]) for p, vols in patients.items()}
    present = []
    for spec in specs:
        name, path = spec.split("=", 1)
        path = path.format(seed=seed)
        if Path(path).is_file():
            present.append(f"{name}={path}")
        else:
            print(f"seed {seed}: no {name} encoder at {path}, left out", flush=True)
    encoders: dict[str, torch.nn.Module | None] = {"pixels": None}
    encoders.update(load_encoders(config, present, seed))
    results: dict[str, list[float]] = {}
    for name, encoder in encoders.items():
        per_patient = {
            p: [torch.cat(f) for f in zip(*(stage_pixels(encoder, image) for image, _ in vols), strict=True)]
            for p, vols in patients.items()
        }
        stages = len(next(iter(per_patient.values())))
        results[name] = [
            leave_one_patient_out({p: f[stage] for p, f in per_patient.items()}, labels, seed)
            for stage in range(stages)
        ]
        print(f"seed {seed}", name, [round(r, 3) for r in results[name]], flush=True)
    return results


def summary(per_seed: dict[int, dict[str, list[float]]]) -> dict[str, dict[str, list[float] | int]]:
    """Per encoder: the mean and std over the seeds that have it, per stage, and their count."""
    names = list(dict.fromkeys(n for results in per_seed.values() for n in results))
    out = {}
    for name in names:
        values = np.array([results[name] for results in per_seed.values() if name in results])
        out[name] = {"mean": values.mean(0).round(4).tolist(), "std": values.std(0).round(4).tolist(),
                     "seeds": len(values)}  # fmt: skip
    return out


def markdown(document: dict) -> str:
    """The summary as a table (stages shallow to deep)."""
    lines = [
        "# Per-pixel linear segmentation probe per encoder stage",
        "",
        f"Written by `{document['command']}`. {document['what']}, mean ± std over seeds "
        f"({len(document['patients'])} validation patients, leave-one-patient-out).",
        "",
    ]
    stages = max(len(row["mean"]) for row in document["summary"].values())
    lines += [
        "| encoder | seeds | " + " | ".join(f"stage {i + 1}" for i in range(stages)) + " |",
        "|---|---|" + "---|" * stages,
    ]
    for name, row in document["summary"].items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(row["mean"], row["std"], strict=True)]
        cells += [""] * (stages - len(cells))  # pixels: one "stage"
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = encoder_parser(__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, help="run seeds (default: --seed); {seed} in PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = run_config(args.run)
    patients = validation_patients(args.run, config.bundle)
    seeds = args.seeds or [args.seed]
    per_seed = {s: seed_results(config, patients, args.encoders, s) for s in seeds}
    document = {
        "benchmark": "linear_segmentation",
        "command": "python " + " ".join(sys.argv),
        "what": "leave-one-patient-out mean Dice (RV, MYO, LV) of a per-pixel linear probe per stage",
        "patients": sorted(patients),
        "config": {"bundle": config.bundle, "difficulty": config.difficulty, "sites": config.sites},
        "environment": environment(),
        "dice_per_stage": {str(s): r for s, r in per_seed.items()},
        "summary": summary(per_seed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(document, indent=1))
    output_file(args.out, ".md").write_text(markdown(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
