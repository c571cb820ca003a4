"""How hard is the phantom? Dice of the best per-volume intensity-interval segmentation.

For every volume and every foreground class (RV, MYO, LV) an oracle that sees the
ground truth picks the intensity interval [lo, hi] whose voxels best match the class
(highest Dice). No real method can do better with intensity alone, so the mean of these
Dice values is an upper bound for intensity thresholding: if it is low, the phantom
cannot be segmented by intensity and needs shape and context.

The oracle is exact: over the volume's distinct intensities, maximising
2*C(I) / (|G| + N(I)) (C: class voxels in interval I, N: all voxels in I, G: the class)
is a fractional problem solved by Dinkelbach iterations, each a maximum-sum interval
(``max_j S_j - min_{i<=j} S_i`` on cumulative sums) of the weights 2*c_v - lambda*n_v.

Also reported, for context: the same oracle inside a box around the heart (the labelled
voxels' bounding box dilated by 20 mm in-plane), as if a perfect detector had cropped it.

Usage::

    .venv/bin/python benchmarks/phantom_difficulty.py            # full size, 4 sites x 10 patients
    .venv/bin/python benchmarks/phantom_difficulty.py --size small --patients-per-site 2 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from fedcontrast.data.io import write_json
from fedcontrast.data.phantom import LABELS, synthesize_dataset
from fedcontrast.data.readers import read_acdc

FOREGROUND = {name: value for name, value in LABELS.items() if value}
BOX_MARGIN_MM = 20.0


def best_interval_dice(image: np.ndarray, target: np.ndarray) -> float:
    """Highest Dice between ``target`` (bool) and ``lo <= image <= hi`` over all intervals [lo, hi].

    Args:
        image: intensities, any shape.
        target: boolean mask of the same shape.

    Returns:
        The optimal Dice in [0, 1] (0 when ``target`` is empty).
    """
    _, inverse = np.unique(image, return_inverse=True)
    n = np.bincount(inverse.ravel()).astype(float)
    c = np.bincount(inverse.ravel(), weights=target.ravel().astype(float), minlength=len(n))
    g = c.sum()
    if g == 0:
        return 0.0
    ratio = 0.0
    while True:
        s = np.concatenate([[0.0], np.cumsum(2 * c - ratio * n)])
        lowest_before = np.minimum.accumulate(s[:-1])
        j = int(np.argmax(s[1:] - lowest_before))
        i = int(np.argmin(s[: j + 1]))
        dice = 2 * c[i : j + 1].sum() / (g + n[i : j + 1].sum())
        if dice <= ratio + 1e-12:
            return float(ratio)
        ratio = dice


def heart_box(label: np.ndarray, spacing: list[float]) -> tuple[slice, ...]:
    """In-plane bounding box of the labelled voxels dilated by :data:`BOX_MARGIN_MM`, all slices."""
    xs, ys = np.nonzero(label.any(axis=2))
    mx, my = (int(np.ceil(BOX_MARGIN_MM / s)) for s in spacing[:2])
    return (
        slice(max(xs.min() - mx, 0), xs.max() + mx + 1),
        slice(max(ys.min() - my, 0), ys.max() + my + 1),
        slice(None),
    )


def score(entry: dict) -> dict:
    """Oracle Dice per class for one datalist entry, on the whole image and inside the heart box."""
    image = np.asarray(nib.load(entry["image"]).dataobj)
    label = np.asarray(nib.load(entry["label"]).dataobj)
    box = heart_box(label, entry["spacing"])
    whole = {name: best_interval_dice(image, label == value) for name, value in FOREGROUND.items()}
    cropped = {
        name: best_interval_dice(image[box], label[box] == value) for name, value in FOREGROUND.items()
    }
    return {
        "method": "intensity_interval_oracle",
        "site": entry["site"],
        "patient": entry["patient"],
        "frame": entry["frame"],
        "dice": {k: round(v, 4) for k, v in whole.items()},
        "dice_mean": round(float(np.mean(list(whole.values()))), 4),
        "heart_box_dice": {k: round(v, 4) for k, v in cropped.items()},
    }


def summarise(rows: list[dict], key: str) -> dict:
    """Mean (and std across volumes) of a per-class Dice field over ``rows``."""
    per_class = {name: [row[key][name] for row in rows] for name in FOREGROUND}
    means = [np.mean(list(row[key].values())) for row in rows]
    return {
        "dice_mean": round(float(np.mean(means)), 4),
        "dice_mean_std": round(float(np.std(means)), 4),
        "dice": {name: round(float(np.mean(v)), 4) for name, v in per_class.items()},
    }


def environment() -> dict:
    """Versions, machine and date."""
    versions = {}
    for package in ("numpy", "scipy", "nibabel", "torch", "monai", "nvflare", "fedcontrast"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": sys.version.split()[0],
        **versions,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients-per-site", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "phantom_difficulty.json"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="phantom_difficulty_") as tmp:
        summary = synthesize_dataset(
            Path(tmp) / "data", args.sites, args.patients_per_site, seed=args.seed, size=args.size
        )
        generated = time.perf_counter() - start
        rows = [score(entry) for entry in read_acdc(Path(tmp) / "data")]
    sites = sorted({row["site"] for row in rows})
    result = {
        "benchmark": "phantom_difficulty",
        "dataset": {
            "name": "fedcontrast cardiac phantom",
            "size": args.size,
            "seed": args.seed,
            "sites": {
                name: {k: v for k, v in s.items() if k != "patients"} for name, s in summary["sites"].items()
            },
            "patients_per_site": args.patients_per_site,
            "volumes_per_site": 2 * args.patients_per_site,
            "labels": LABELS,
        },
        "config": {
            "method": "intensity_interval_oracle",
            "description": "per volume and class, the intensity interval with the highest Dice against the "
            "ground truth (exact, Dinkelbach); whole image; heart_box: inside the labelled bounding box "
            f"dilated by {BOX_MARGIN_MM} mm in-plane",
            "classes": list(FOREGROUND),
        },
        "environment": environment(),
        "results": {
            "volumes": len(rows),
            "whole_image": summarise(rows, "dice"),
            "heart_box": summarise(rows, "heart_box_dice"),
            "per_site": {site: summarise([r for r in rows if r["site"] == site], "dice") for site in sites},
            "generate_s": round(generated, 2),
            "wall_s": round(time.perf_counter() - start, 2),
        },
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"{len(rows)} volumes: whole image {result['results']['whole_image']}")
    print(f"heart box {result['results']['heart_box']}")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
