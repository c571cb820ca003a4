"""Inference input and output: validate every input volume before anything is written; write atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.config import NdarrayOrTensor
from monai.data import NibabelWriter

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


def _nifti_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable 3D NIfTI volume, or ``None`` when it is one."""
    if not path.name.endswith(NIFTI_SUFFIXES):
        return "not a NIfTI file name (expected .nii or .nii.gz)"
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            return f"not a NIfTI image ({type(img).__name__})"
        if len(img.shape) != 3:
            return f"not a 3D volume (shape {img.shape})"
        data = np.asanyarray(img.dataobj)  # reads every voxel: catches truncated or corrupt files
    except Exception as err:  # any reader failure means "not readable", reported with its cause
        return f"not readable as NIfTI ({type(err).__name__}: {err})"
    if np.issubdtype(data.dtype, np.floating) and not (finite := np.isfinite(data)).all():
        # NaN voxels would silently give an all-background segmentation
        return f"{data.size - int(finite.sum())} non-finite voxel(s) (NaN or Inf); fix or drop this scan"
    return None


def nifti_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Inference datalist ``[{"image": path}, ...]`` of the NIfTI volumes in ``dataset_dir``, sorted.

    Every visible file must be a readable 3D ``.nii``/``.nii.gz`` volume (voxels read in full);
    hidden files (``.*``) and sub-folders are skipped. All files are checked before returning,
    so a bad input stops inference before any output is written.

    Raises:
        FileNotFoundError: ``dataset_dir`` is not a folder.
        ValueError: the folder holds no volume, or some files are not readable 3D NIfTI or
            hold non-finite (NaN, Inf) voxels; the message names every such file and why.
    """
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    bad = {p: why for p in files if (why := _nifti_problem(p)) is not None}
    if bad:
        details = "; ".join(f"{p}: {why}" for p, why in bad.items())
        raise ValueError(f"{len(bad)} input file(s) in {folder} are not usable 3D NIfTI volumes: {details}")
    if not files:
        raise ValueError(f"no NIfTI volume (.nii, .nii.gz) in {folder}")
    return [{"image": str(p.resolve())} for p in files]


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` whose files appear complete or not at all (temporary file, then rename),
    and whose output keeps every spatial dimension of its input."""

    def set_data_array(
        self,
        data_array: NdarrayOrTensor,
        channel_dim: int | None = 0,
        squeeze_end_dims: bool = True,
        **kwargs,
    ) -> None:
        """Channel-last array of ``data_array`` (``(C, X, Y, Z)`` with ``channel_dim=0``).

        MONAI's ``squeeze_end_dims`` removes every trailing singleton dimension, so a single-slice
        ``(1, X, Y, 1)`` segmentation would be saved 2-D ``(X, Y)``; here only a single channel
        is removed, giving ``(X, Y, 1)`` as the input scan had.
        """
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if squeeze_end_dims and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs) -> None:
        """Write to a hidden temporary file beside ``filename``, then rename it to ``filename``."""
        target = Path(filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)
            os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
