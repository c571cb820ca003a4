"""Up-front checks of datasets and datalists.

Every failure raises :class:`DataValidationError` (a ``ValueError``, so the
``fedcontrast`` command prints it and exits with status 2) whose message names
the offending file or site. Geometry is checked from NIfTI headers only; the value
check (``check_values``) also reads every voxel: labels must hold declared values, images
must be finite (one NaN or Inf voxel turns every site's loss, and then the federated
model, into NaN) and complete (a truncated file with an intact header fails here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

#: Largest difference (mm) tolerated between an image's and its label's affine entries.
AFFINE_ATOL_MM = 1e-3


class DataValidationError(ValueError):
    """Invalid input data; the message names the file or site at fault."""


class Geometry(NamedTuple):
    """What a NIfTI header says about a volume's grid.

    ``shape``: voxels per axis (slice axis third); ``spacing``: voxel size in mm
    for each axis of ``shape``; ``affine``: 4x4 voxel-to-world matrix in mm.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray


def read_geometry(path: str | Path) -> Geometry:
    """Read a NIfTI file's header (not its voxels).

    Raises:
        DataValidationError: the file is missing or is not a readable NIfTI file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape)
        spacing = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
        affine = np.asarray(img.affine, dtype=float)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataValidationError(f"{path}: unreadable or corrupt NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataValidationError(f"{path}: not a NIfTI file ({type(img).__name__})")
    return Geometry(shape, spacing, affine)


def load_voxels(path: str | Path) -> np.ndarray:
    """Load a NIfTI file's voxel array (as stored, no scaling to float for integer labels).

    Raises:
        DataValidationError: the file is missing, unreadable, or its data is truncated or corrupt.
    """
    read_geometry(path)
    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:
        raise DataValidationError(f"{path}: unreadable or corrupt NIfTI data ({exc})") from exc


def check_3d(path: str | Path, geometry: Geometry) -> None:
    """Raise unless ``geometry`` (read from ``path``) is a 3D volume."""
    if len(geometry.shape) != 3:
        raise DataValidationError(
            f"{path}: expected a 3D volume, found {len(geometry.shape)}D with shape {geometry.shape}"
        )


def check_pair(image: str | Path, label: str | Path) -> Geometry:
    """Check that an image and its label are 3D volumes on the same grid; returns the image geometry.

    Raises:
        DataValidationError: either file is missing/corrupt/not 3D, or the shapes or affines differ.
    """
    img_geom, lab_geom = read_geometry(image), read_geometry(label)
    check_3d(image, img_geom)
    check_3d(label, lab_geom)
    if img_geom.shape != lab_geom.shape:
        raise DataValidationError(
            f"{label}: label shape {lab_geom.shape} does not match image {image} shape {img_geom.shape}"
        )
    if not np.allclose(img_geom.affine, lab_geom.affine, rtol=0, atol=AFFINE_ATOL_MM):
        lab_affine, img_affine = (np.round(g.affine, 3).tolist() for g in (lab_geom, img_geom))
        raise DataValidationError(
            f"{label}: label affine does not match image {image} affine "
            f"(label {lab_affine} vs image {img_affine})"
        )
    return img_geom


def check_label_values(path: str | Path, allowed: Iterable[int]) -> None:
    """Raise unless every voxel of the label file ``path`` is one of ``allowed``."""
    allowed = sorted(set(int(v) for v in allowed))
    values = np.unique(load_voxels(path))
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        raise DataValidationError(f"{path}: label values {bad} outside the declared set {allowed}")


def check_finite_voxels(path: str | Path) -> None:
    """Raise unless every voxel of the image file ``path`` is finite (no NaN, no +-Inf).

    Raises:
        DataValidationError: the file is unreadable or truncated, or holds non-finite voxels;
            the message names the file and counts them.
    """
    data = load_voxels(path)
    if not np.issubdtype(data.dtype, np.floating):
        return  # integer voxels are always finite
    finite = np.isfinite(data)
    if not finite.all():
        nan = int(np.isnan(data).sum())
        raise DataValidationError(
            f"{path}: {nan} NaN and {data.size - int(finite.sum()) - nan} Inf voxel(s) of {data.size}; "
            "fix or drop this volume (a non-finite voxel makes the federated model NaN)"
        )


def validate_entries(
    entries: Sequence[Mapping], labels: Mapping[str, int], check_values: bool = True
) -> None:
    """Check a list of datalist entries before anything is written or trained on.

    Args:
        entries: dicts with ``"image"`` and optionally ``"label"`` (paths).
        labels: the declared label set, ``{name: value}``.
        check_values: also read every voxel: each label's values against ``labels``, each
            image finite (:func:`check_finite_voxels`).

    Raises:
        DataValidationError: the first problem found, naming its file.
    """
    for entry in entries:
        if "label" in entry:
            check_pair(entry["image"], entry["label"])
            if check_values:
                check_label_values(entry["label"], labels.values())
        else:
            check_3d(entry["image"], read_geometry(entry["image"]))
        if check_values:
            check_finite_voxels(entry["image"])


def check_unique_volumes(entries: Iterable[Mapping]) -> None:
    """Refuse two volumes with the same site, patient id and frame (a duplicated patient id).

    Patients are the unit of a split (all of a test patient's volumes are tested); two
    different patients under one id would be merged into one silently, and the same file
    listed twice would be counted twice.

    Args:
        entries: reader entries with ``"image"``, ``"patient"``, ``"frame"`` and ``"site"``
            (entries without ``"site"`` count as one site).

    Raises:
        DataValidationError: one line naming the site, the duplicated id and frame, and both files.
    """
    seen: dict[tuple[str, str, str], str] = {}
    for entry in entries:
        site, patient, frame = str(entry.get("site", "")), str(entry["patient"]), str(entry.get("frame", ""))
        if (site, patient, frame) in seen:
            first, image = seen[(site, patient, frame)], entry["image"]
            where = f"site {site!r}: " if site else ""
            raise DataValidationError(
                f"{where}duplicate patient id {patient!r} (frame {frame}): {first} and {image}; "
                "patient ids must be unique within a site (rename one patient, or give the volumes "
                "distinct frames)"
            )
        seen[(site, patient, frame)] = str(entry["image"])
