"""Atomic writers: every output file appears complete or not at all (temporary file, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def _atomic_target(path: Path, suffix: str) -> Path:
    """A fresh temporary path next to ``path`` (same file system, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns ``path``."""
    path = Path(path)
    tmp = _atomic_target(path, ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``array`` with the voxel-to-world ``affine`` (mm) as NIfTI-1 at ``path`` atomically.

    The header's voxel sizes come from the affine; qform and sform are both set
    (code 1, scanner) so every reader agrees on the geometry.
    """
    path = Path(path)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = _atomic_target(path, suffix)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
