"""A site's pre-training volumes, loaded once through the bundle's preprocessing and kept in memory.

Self-supervised pre-training uses the images of a site datalist's ``training``
and ``unlabeled`` entries (labels ignored, docs/architecture.md). The bundle's
deterministic preprocessing (load, channel first, orientation, resampling,
normalisation, crop/pad) gives every volume as a channel-first tensor
``(C, H, W, D)`` with the slice axis last, the layout
:class:`~fedcontrast.methods.partitions.PartitionSampler` expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import convert_to_tensor

from fedcontrast.nets.bundle import build_preprocessing


def pretraining_entries(site_datalist: Mapping[str, Any]) -> list[dict]:
    """The label-free entries (``{"image": path}``, with ``"patient"`` and ``"cine"`` where the
    datalist names them: the frames of one patient pair up, and its cine series gives the rest of
    its cycle) of a site datalist's ``training + unlabeled`` lists."""
    entries = [*site_datalist.get("training", []), *site_datalist.get("unlabeled", [])]
    return [{k: entry[k] for k in ("image", "patient", "cine") if k in entry} for entry in entries]


def frames_by_patient(entries: list[dict]) -> dict[str, list[int]]:
    """Indices of ``entries`` grouped by their ``"patient"`` (an entry without one is its own
    group, keyed by its image path), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        groups.setdefault(entry.get("patient") or entry["image"], []).append(index)
    return groups


def load_volumes(
    entries: list[dict],
    bundle_dir: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[torch.Tensor]:
    """Preprocess every entry's image once.

    Args:
        entries: datalist entries with an ``"image"`` path (other keys are ignored).
        bundle_dir: bundle folder (None: the default bundle).
        overrides: bundle config overrides for the preprocessing.

    Returns:
        One float32 CPU tensor ``(C, H, W, D)`` per entry, in order; all share ``C, H, W``.

    Raises:
        ValueError: no entries, a volume with NaN or Inf voxels (named), or volumes whose
            channel or in-plane sizes differ.
    """
    if not entries:
        raise ValueError("no volumes to pre-train on: the datalist has no training or unlabeled images")
    preprocessing = build_preprocessing(bundle_dir, dict(overrides or {}))
    volumes = []
    for entry in entries:
        image = preprocessing({"image": entry["image"]})["image"]
        volume = convert_to_tensor(image, track_meta=False, dtype=torch.float32)
        if not bool(torch.isfinite(volume).all()):
            raise ValueError(f"{entry['image']}: NaN or Inf voxels (`fedcontrast data check --values`)")
        volumes.append(volume)
    shapes = {tuple(v.shape[:3]) for v in volumes}
    if len(shapes) > 1 or volumes[0].ndim != 4:
        raise ValueError(
            f"preprocessed volumes must be (C, H, W, D) with one (C, H, W); got shapes "
            f"{sorted({tuple(v.shape) for v in volumes})} (check the bundle's crop/pad size)"
        )
    return volumes
