"""How well does a motion mask find the heart? Two stored frames against the whole cine series.

``fedmotion``'s target (:func:`~fedcontrast.methods.fedmotion.patient_motion_mask`) is, per
patient, where its frames differ. This scores that mask against each frame's labelled heart
(RV, MYO and LV as one class) for two sources of frames: the patient's stored ED and ES
frames (what the methods pre-train on), and its whole cine series (``"cine"`` in the entries;
the phantom writes it with ``--cine``). Per volume: Dice, precision (how much of the mask is
heart) and recall (how much of the heart the mask covers); averaged over the volumes of the
pre-training pool and, separately, of the validation patients. No test patient is read.
``--smooth-mm`` scores the masks at several in-plane smoothings (``fedmotion``'s ``smooth_mm``),
``--phase-bins`` the cine series averaged into several phase counts (``fedmotion``'s
``phase_bins``), and several ``--run`` folders (other phantoms) are pooled, so that either can
be chosen on the validation patients. ``--rule`` also scores a label-free choice of the phase
count, made per patient among ``--phase-bins``: the count whose motion map the mask's two
k-means classes split most cleanly (Otsu's separability, :func:`separability`):

    python benchmarks/motion_mask_quality.py --run workspace/cine/smotion480_cine \
        --out benchmarks/results/label_efficiency_ablations/motion/mask_quality
    python benchmarks/motion_mask_quality.py --run RUN_D0 RUN_D1 RUN_D2 --smooth-mm 3 6 9 12 15 \
        --out benchmarks/results/label_efficiency_ablations/fedmotion/mask_smoothing
    python benchmarks/motion_mask_quality.py --run RUN --phase-bins 0 3 6 12 --out .../chest/mask_phases
    python benchmarks/motion_mask_quality.py --run RUN --phase-bins 0 2 3 4 6 8 12 --rule --out .../phase_rule
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedcontrast.bench.environment import environment
from fedcontrast.bench.protocol import image_labels
from fedcontrast.bench.report import output_file
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.methods.fedmotion import frames_motion_spread, spread_motion_mask, standardised_frames
from fedcontrast.methods.volumes import frames_by_patient, pretraining_entries

#: Which frames a mask is computed from: the entries as the split lists them, or without their cine.
SOURCES = ("cine series", "ED and ES frames")
#: The label-free rule's key in place of a phase count: the most separable of the scored counts.
RULE = "most separable"


def overlap(mask: np.ndarray, heart: np.ndarray) -> dict[str, float]:
    """Dice, precision and recall of the boolean ``mask`` against the boolean ``heart`` (same shape)."""
    both = float((mask & heart).sum())
    return {
        "dice": 2 * both / max(float(mask.sum() + heart.sum()), 1.0),
        "precision": both / max(float(mask.sum()), 1.0),
        "recall": both / max(float(heart.sum()), 1.0),
    }


def separability(spread: np.ndarray, mask: np.ndarray) -> float:
    """Otsu's separability of a two-class split: the variance between the ``mask`` (boolean) and the
    rest of ``spread`` (same shape) over the total variance, in [0, 1] (1: two constant classes)."""
    values, inside = spread.astype(np.float64).ravel(), mask.ravel()
    share = float(inside.mean())
    if share in (0.0, 1.0) or values.var() == 0:
        return 0.0
    gap = values[inside].mean() - values[~inside].mean()
    return share * (1 - share) * gap**2 / float(values.var())


def patient_scores(
    entries: list[dict[str, Any]],
    labels: dict[str, str],
    smoothings: Sequence[float] = (6.0,),
    bins: Sequence[int] = (0,),
    rule: bool = False,
) -> dict[tuple[str, float, int | str], list[dict]]:
    """``{(source, smooth_mm, phase_bins): [overlap of each entry's frame]}`` for one patient's
    ``entries``: each source of :data:`SOURCES` read once, its masks smoothed by each of
    ``smoothings`` (mm) and, for the cine series, averaged into each of ``bins`` phases (0: none;
    the two stored frames are scored once per smoothing, under ``bins[0]``). With ``rule``, also
    the cine series at the phase count of ``bins`` whose mask splits the motion map most cleanly
    (:func:`separability`; label-free, chosen per patient), under :data:`RULE`, each overlap with
    its ``phase_bins``. A source with fewer than two frames has no mask and no scores."""
    stored = [{k: v for k, v in e.items() if k != "cine"} for e in entries]
    hearts = [np.asarray(nib.load(labels[e["image"]]).dataobj) > 0 for e in entries]
    scores: dict[tuple[str, float, int | str], list[dict]] = {}
    for source, sources in zip(SOURCES, (entries, stored), strict=True):
        if source == SOURCES[0] and "cine" not in entries[0]:
            continue
        found = standardised_frames(sources)
        if found is None:
            continue
        frames, zooms = found[0], found[1].header.get_zooms()
        for smooth_mm in smoothings:
            split = {}
            for phase_bins in bins if source == SOURCES[0] else bins[:1]:
                spread = frames_motion_spread(frames, zooms, smooth_mm, phase_bins)
                mask = spread_motion_mask(spread) > 0
                scores[source, smooth_mm, phase_bins] = [overlap(mask, heart) for heart in hearts]
                if rule:
                    split[phase_bins] = separability(spread[0, 0].numpy(), mask)
            if rule and source == SOURCES[0]:
                pick = max(split, key=split.get)
                scores[source, smooth_mm, RULE] = [
                    {**o, "phase_bins": pick} for o in scores[source, smooth_mm, pick]
                ]
    return scores


def summary(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over volumes of each overlap measure, the volume count and, for the label-free
    rule's scores, how many volumes took each phase count."""
    result: dict[str, Any] = {
        "volumes": len(scores),
        **{
            k: {"mean": float(np.mean([s[k] for s in scores])), "std": float(np.std([s[k] for s in scores]))}
            for k in ("dice", "precision", "recall")
        },
    }
    if "phase_bins" in scores[0]:
        picks = [s["phase_bins"] for s in scores]
        result["phase_bins"] = {str(b): picks.count(b) for b in sorted(set(picks))}
    return result


def source_name(
    source: str,
    smooth_mm: float,
    smoothings: Sequence[float],
    phase_bins: int | str = 0,
    bins: Sequence[int] = (0,),
) -> str:
    """``source``, with its smoothing when several are scored and, for the cine series, its phase
    count (or :data:`RULE`) when several are."""
    name = source if len(smoothings) == 1 else f"{source}, {smooth_mm:g} mm"
    if source != SOURCES[0] or len(bins) == 1:
        return name
    count = phase_bins if phase_bins == RULE else f"{phase_bins} phases" if phase_bins else "every frame"
    return f"{name}, {count}"


def measure(
    runs: Sequence[Path], smoothings: Sequence[float] = (6.0,), bins: Sequence[int] = (0,), rule: bool = False
) -> dict[str, Any]:
    """Every site's pre-training and validation patients of the bench run folders ``runs``, pooled,
    at each in-plane smoothing of ``smoothings`` (mm) and each phase count of ``bins``
    (:func:`~fedcontrast.methods.fedmotion.phase_means`; 0: every frame), and with ``rule`` the
    count :func:`patient_scores` picks per patient without a label."""
    groups: dict[str, dict[str, list]] = {}
    for run in runs:
        labels = image_labels(run / "data", "acdc", run / "frames")
        splits = sorted((run / "splits").glob("N*"), key=lambda p: int(p.name[1:]))[0]
        for path in sorted(splits.glob("site-*.json")):
            datalist = load_site_datalist(path)
            pools = {"pre-training": pretraining_entries(datalist), "validation": datalist["validation"]}
            for pool, entries in pools.items():
                for indices in frames_by_patient(entries).values():
                    scores = patient_scores([entries[i] for i in indices], labels, smoothings, bins, rule)
                    for (source, smooth_mm, phase_bins), values in scores.items():
                        name = source_name(source, smooth_mm, smoothings, phase_bins, bins)
                        groups.setdefault(pool, {}).setdefault(name, []).extend(values)
    return {
        pool: {source: summary(v) for source, v in by_source.items()} for pool, by_source in groups.items()
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| volumes | frames | n | Dice | precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for pool, by_source in result["pools"].items():
        for source, s in by_source.items():
            cells = " | ".join(
                f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in ("dice", "precision", "recall")
            )
            lines.append(f"| {pool} | {source} | {s['volumes']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, nargs="+", required=True, help="bench run folders (phantoms written with --cine)"
    )
    parser.add_argument("--smooth-mm", type=float, nargs="+", default=[6.0], help="in-plane smoothings, mm")
    parser.add_argument(
        "--phase-bins",
        type=int,
        nargs="+",
        default=[0],
        help="phase counts of the cine series (default 0: every frame, as sections 19-22 scored; "
        "fedmotion's default is 6)",
    )
    parser.add_argument(
        "--rule",
        action="store_true",
        help="also score, per patient, the phase count whose motion map splits most cleanly (no label)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = {
        "command": " ".join(["python", "benchmarks/motion_mask_quality.py", *(argv or sys.argv[1:])]),
        "runs": [str(run) for run in args.run],
        "smooth_mm": args.smooth_mm,
        "phase_bins": args.phase_bins,
        "environment": environment(),
        "rule": args.rule,
        "pools": measure(args.run, args.smooth_mm, args.phase_bins, args.rule),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(result, indent=1))
    output_file(args.out, ".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
