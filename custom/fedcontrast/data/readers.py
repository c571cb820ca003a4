"""Dataset readers: ACDC, M&Ms and Decathlon-style layouts to MONAI datalist entries.

Every reader returns a list of entries, one per 3D volume::

    {"image": "/abs/path.nii.gz", "label": "/abs/path_gt.nii.gz",  # label only when present
     "site": "site-1", "patient": "patient001", "frame": "ED" | "ES" | int,
     "spacing": [sx, sy, sz],  # mm, from the image header
     "cine": "/abs/path_4d.nii.gz"}  # the patient's whole cine series, where the dataset has one

Readers check what they can from file names and headers (missing files, corrupt
headers, 4D where 3D is expected) and raise :class:`DataValidationError` naming
the file or site; :func:`fedcontrast.data.validation.validate_entries` checks
image/label pairs and label values.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from fedcontrast.data.io import save_nifti
from fedcontrast.data.labels import ACDC_LABELS, check_label_set  # ACDC's: every cardiac reader's
from fedcontrast.data.validation import (
    DataValidationError,
    Geometry,
    check_3d,
    check_unique_volumes,
    read_geometry,
)

#: M&Ms label value -> ACDC label value (M&Ms: 1 LV, 2 MYO, 3 RV; ACDC swaps 1 and 3).
MNMS_TO_ACDC = np.array([0, 3, 2, 1], dtype=np.uint8)

#: Columns the M&Ms information CSV must have.
MNMS_COLUMNS = ("External code", "Vendor", "Centre", "ED", "ES")

#: Sub-folders of an ACDC download that together form one dataset (one site).
ACDC_PARTS = ("training", "testing")

Format = Literal["acdc", "mnms", "decathlon"]
FORMATS: tuple[str, ...] = ("acdc", "mnms", "decathlon")

_PATIENT_DIR = re.compile(r"patient\d+")


def _entry(
    image: Path, label: Path | None, site: str, patient: str, frame: str | int, cine: Path | None = None
) -> dict[str, Any]:
    """A datalist entry for a 3D image (and its label), with the spacing read from the image header,
    and the patient's 4D ``cine`` series when there is one.

    Raises:
        DataValidationError: the image is not 3D, or the cine is not 4D or its frames are not
            the image's shape (both files named).
    """
    geometry = read_geometry(image)
    check_3d(image, geometry)
    entry: dict[str, Any] = {"image": str(image)}
    if label is not None:
        entry["label"] = str(label)
    entry.update(site=site, patient=patient, frame=frame, spacing=[round(s, 6) for s in geometry.spacing])
    if cine is not None:
        frame_shape = _check_cine(cine).shape[:3]
        if frame_shape != geometry.shape:
            raise DataValidationError(
                f"{cine}: frames of shape {frame_shape} do not match {image} ({geometry.shape})"
            )
        entry["cine"] = str(cine)
    return entry


def _nifti(folder: Path, stem: str) -> Path:
    """``folder/stem.nii.gz``, or ``folder/stem.nii`` when only that exists."""
    gz = folder / f"{stem}.nii.gz"
    plain = folder / f"{stem}.nii"
    return plain if not gz.exists() and plain.exists() else gz


# ACDC --------------------------------------------------------------------------------------------


def read_info_cfg(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines) into a dict.

    Raises:
        DataValidationError: the file is missing, or lacks integer ``ED`` and ``ES`` frame numbers.
    """
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    info = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit() or int(info[key]) < 1:
            raise DataValidationError(f"{path}: {key} must be a 1-based frame number, got {info.get(key)!r}")
    return info


def _acdc_patient(folder: Path, site: str, allow_unlabeled: bool) -> list[dict[str, Any]]:
    """The ED and ES entries of one ACDC patient folder (frames are 1-based in ``Info.cfg``), with
    the patient's ``<patient>_4d`` cine series where the folder has it."""
    info = read_info_cfg(folder / "Info.cfg")
    cine = _nifti(folder, f"{folder.name}_4d")
    entries = []
    for phase in ("ED", "ES"):
        stem = f"{folder.name}_frame{int(info[phase]):02d}"
        image, label = _nifti(folder, stem), _nifti(folder, f"{stem}_gt")
        if not image.is_file():
            raise DataValidationError(
                f"{image}: file not found ({phase} frame {info[phase]} of {folder}/Info.cfg)"
            )
        if not label.is_file():
            if not allow_unlabeled:
                raise DataValidationError(f"{label}: file not found (label of {phase}; pass allow_unlabeled)")
            label = None
        entries.append(_entry(image, label, site, folder.name, phase, cine if cine.is_file() else None))
    return entries


def _patient_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT_DIR.fullmatch(p.name))


def read_acdc(
    root: str | Path, site: str | None = None, allow_unlabeled: bool = False
) -> list[dict[str, Any]]:
    """Read an ACDC-layout dataset.

    ``root`` is either one site (``root/patientXXX/{Info.cfg, patientXXX_frameYY.nii.gz,
    patientXXX_frameYY_gt.nii.gz}``; also an ACDC download whose ``training``/``testing``
    folders hold the patients), named ``site`` or after the folder, or several sites
    (``root/<site>/patientXXX/...``, e.g. the phantom), each named after its folder.
    Each patient gives an ``"ED"`` and an ``"ES"`` entry; ``Info.cfg`` frame numbers are 1-based.

    Args:
        root: dataset folder.
        site: name of the site when ``root`` is a single site.
        allow_unlabeled: accept volumes without ``_gt`` file (entries without ``"label"``);
            otherwise a missing label file is an error.

    Raises:
        DataValidationError: missing folder or file, malformed ``Info.cfg``, a site without
            patients, a patient id found twice in a site, a corrupt header or a non-3D volume.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataValidationError(f"{root}: dataset folder not found")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    parts = [p for p in subdirs if p.name in ACDC_PARTS]
    if _patient_dirs(root) or parts:
        sites = {site or root.name: [root, *parts]}
    elif site is not None:
        raise DataValidationError(f"{root}: site={site!r} given but the folder holds no patientXXX folders")
    elif subdirs:
        sites = {p.name: [p] for p in subdirs}
    else:
        raise DataValidationError(f"{root}: no patientXXX folders and no site folders")
    entries: list[dict[str, Any]] = []
    for name, folders in sites.items():
        patients = sorted((p for folder in folders for p in _patient_dirs(folder)), key=lambda p: p.name)
        if not patients:
            raise DataValidationError(f"site {name!r} ({folders[0]}): no volumes (no patientXXX folders)")
        for patient in patients:
            entries += _acdc_patient(patient, name, allow_unlabeled)
    check_unique_volumes(entries)  # e.g. patient001 in both training/ and testing/
    return entries


# M&Ms --------------------------------------------------------------------------------------------


def read_mnms_info(path: Path) -> dict[str, dict[str, str]]:
    """Read the M&Ms information CSV into ``{external code: row}`` (header names stripped).

    Raises:
        DataValidationError: missing file, missing columns or duplicate codes.
    """
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [
            {(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)
        ]
    missing = [c for c in MNMS_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise DataValidationError(f"{path}: missing columns {missing} (need {list(MNMS_COLUMNS)})")
    info: dict[str, dict[str, str]] = {}
    for row in rows:
        code = row["External code"]
        if code in info:
            raise DataValidationError(f"{path}: external code {code!r} listed twice")
        info[code] = row
    return info


def _find_mnms_csv(root: Path) -> Path:
    """The one CSV in ``root`` (or its parent) that has the M&Ms information columns."""
    for folder in (root, root.parent):
        for path in sorted(folder.glob("*.csv")):
            with path.open(newline="", encoding="utf-8-sig") as handle:
                header = {h.strip() for h in next(csv.reader(handle), [])}
            if set(MNMS_COLUMNS) <= header:
                return path
    raise DataValidationError(f"{root}: no M&Ms information CSV with columns {list(MNMS_COLUMNS)} found")


def _frame_index(info_csv: Path, code: str, phase: str, value: str, n_frames: int) -> int:
    """A 0-based M&Ms frame index from the CSV, checked against the cine's frame count."""
    if not value.lstrip("-").isdigit() or not 0 <= int(value) < n_frames:
        raise DataValidationError(
            f"{info_csv}: {phase} of {code} must be a 0-based frame index below {n_frames}, got {value!r}"
        )
    return int(value)


def _extract_frame(source: Path, index: int, target: Path, remap: bool) -> Path:
    """Write frame ``index`` of the 4D NIfTI ``source`` to ``target`` (same affine) unless up to date.

    ``remap`` converts M&Ms label values to ACDC ones (after checking they are 0..3).
    """
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    img = nib.load(source)
    try:
        volume = np.asanyarray(img.dataobj[..., index])
    except Exception as exc:
        raise DataValidationError(f"{source}: unreadable or corrupt NIfTI data ({exc})") from exc
    if remap:
        values = np.unique(volume)
        bad = [v for v in values.tolist() if v not in range(len(MNMS_TO_ACDC))]
        if bad:
            raise DataValidationError(f"{source}: label values {bad} outside the M&Ms set [0, 1, 2, 3]")
        volume = MNMS_TO_ACDC[volume.astype(np.intp)]
    return save_nifti(target, volume, img.affine)


def _check_cine(path: Path) -> Geometry:
    geometry = read_geometry(path)
    if len(geometry.shape) != 4:
        raise DataValidationError(
            f"{path}: expected a 4D cine (x, y, slices, frames), found shape {geometry.shape}"
        )
    return geometry


def read_mnms(
    root: str | Path,
    cache_dir: str | Path,
    site_key: Literal["vendor", "centre"] = "vendor",
    info_csv: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Read the M&Ms dataset, extracting the ED and ES frames as 3D NIfTI files.

    ``root`` holds ``<CODE>/<CODE>_sa.nii.gz`` (4D cine, x, y, slices, frames) and, for
    labelled cases, ``<CODE>/<CODE>_sa_gt.nii.gz`` at any depth (e.g. ``OpenDataset`` with
    ``Training/Labeled``, ``Training/Unlabeled``, ``Validation``, ``Testing``). The CSV
    (``info_csv``, else the one in ``root`` or its parent with the columns of
    :data:`MNMS_COLUMNS`) gives each case's vendor, centre and **0-based** ED/ES frame indices.
    Frames are written to ``cache_dir/<site>/<CODE>/<CODE>_sa_{ED,ES}[_gt].nii.gz`` with the
    cine's affine (re-used while newer than the source); labels are remapped to the ACDC
    convention (M&Ms 1 LV / 3 RV become 3 LV / 1 RV). Cases in the CSV but not on disk are skipped.

    Args:
        root: dataset folder.
        cache_dir: where the extracted 3D frames go.
        site_key: ``"vendor"`` (A-D) or ``"centre"`` (1-5) names the site.
        info_csv: the information CSV, when not found automatically.

    Raises:
        DataValidationError: no cases, a case missing from the CSV, bad frame indices, a cine
            that is not 4D, a label cine whose shape or affine differs from the image's, label
            values outside 0..3, corrupt files.
    """
    root, cache_dir = Path(root).resolve(), Path(cache_dir).resolve()
    if site_key not in ("vendor", "centre"):
        raise DataValidationError(f"site_key {site_key!r}: M&Ms sites are 'vendor' or 'centre'")
    if not root.is_dir():
        raise DataValidationError(f"{root}: dataset folder not found")
    info_path = Path(info_csv).resolve() if info_csv else _find_mnms_csv(root)
    info = read_mnms_info(info_path)
    cines: dict[str, Path] = {}
    for cine in sorted(root.rglob("*_sa.nii.gz")):
        code = cine.name[: -len("_sa.nii.gz")]
        if code in cines:
            raise DataValidationError(f"{cine}: case {code!r} also found at {cines[code]}")
        cines[code] = cine
    if not cines:
        raise DataValidationError(f"{root}: no M&Ms cases (<CODE>/<CODE>_sa.nii.gz)")
    entries: list[dict[str, Any]] = []
    for code, cine in sorted(cines.items()):
        if code not in info:
            raise DataValidationError(f"{cine}: case {code!r} is not listed in {info_path}")
        row = info[code]
        site = row["Vendor" if site_key == "vendor" else "Centre"]
        if not site:
            raise DataValidationError(f"{info_path}: case {code!r} has no {site_key}")
        geometry = _check_cine(cine)
        gt = cine.with_name(f"{code}_sa_gt.nii.gz")
        if gt.exists():
            gt_geometry = _check_cine(gt)
            if gt_geometry.shape != geometry.shape or not np.allclose(
                gt_geometry.affine, geometry.affine, atol=1e-3
            ):
                raise DataValidationError(f"{gt}: shape or affine does not match {cine}")
        for phase in ("ED", "ES"):
            index = _frame_index(info_path, code, phase, row[phase], geometry.shape[3])
            folder = cache_dir / site / code
            image = _extract_frame(cine, index, folder / f"{code}_sa_{phase}.nii.gz", remap=False)
            label = (
                _extract_frame(gt, index, folder / f"{code}_sa_{phase}_gt.nii.gz", remap=True)
                if gt.exists()
                else None
            )
            entries.append(_entry(image, label, site, code, phase, cine))
    return entries


# Decathlon ---------------------------------------------------------------------------------------


def _decathlon_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path).resolve()
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataValidationError(f"{path}: not valid JSON ({exc})") from exc


def parse_labels(labels: Mapping[str, Any], source: str | Path) -> dict[str, int]:
    """Declared labels as ``{name: value}``, from ``{"0": "background"}`` or ``{"background": 0}`` form."""
    if not labels:
        raise DataValidationError(f"{source}: no labels declared")
    if all(str(k).isdigit() for k in labels):
        parsed = {str(name): int(value) for value, name in labels.items()}
    elif all(isinstance(v, int) for v in labels.values()):
        parsed = {str(name): int(value) for name, value in labels.items()}
    else:
        raise DataValidationError(f"{source}: labels must map values to names or names to integer values")
    if len(set(parsed.values())) != len(parsed):
        raise DataValidationError(f"{source}: label values declared twice in {dict(labels)}")
    return check_label_set(parsed, str(source))


def read_decathlon_labels(path: str | Path) -> dict[str, int]:
    """The label set declared in a Decathlon ``dataset.json`` (file or its folder), ``{name: value}``."""
    json_path, data = _decathlon_json(path)
    return parse_labels(data.get("labels") or {}, json_path)


def _stem(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def read_decathlon(
    path: str | Path,
    site_key: str | None = None,
    site: str | None = None,
    unlabelled_keys: Sequence[str] = ("test",),
    missing_site: str | None = None,
) -> list[dict[str, Any]]:
    """Read a Decathlon-style ``dataset.json`` (the file or its folder).

    ``training`` items (``{"image", "label", ...}``) give labelled entries; the items of each
    ``unlabelled_keys`` list (paths or ``{"image"}``; default the ``test`` list) unlabelled ones,
    which a split puts in ``unlabeled``: pre-training images. Relative paths are resolved against
    the JSON's folder. An item's ``patient`` (default: the image file name without extension)
    and ``frame`` (default 0) are kept. Its site is the item's ``site_key`` value when given,
    else ``site``, else the folder name. With ``site_key``, items without that key go to site
    ``missing_site``; without ``missing_site`` they are refused, all counted in one message.
    The declared label set is :func:`read_decathlon_labels`.

    Raises:
        DataValidationError: missing or malformed JSON, an item without image (or label), items
            without the site key (counted per list) and no ``missing_site``, two volumes of one
            site with the same patient and frame, missing files, corrupt headers, non-3D volumes.
    """
    json_path, data = _decathlon_json(path)
    base = json_path.parent
    default_site = site or base.name
    if "training" in unlabelled_keys:
        raise DataValidationError(f"{json_path}: 'training' is the labelled list, not an unlabelled one")
    lists = [("training", True)] + [(key, False) for key in unlabelled_keys]
    items = []
    for key, labelled in lists:
        raw = data.get(key, [])
        if not isinstance(raw, list):
            raise DataValidationError(f"{json_path}: {key!r} must be a list of items")
        items += [
            (key, number, {"image": i} if isinstance(i, str) else i, labelled) for number, i in enumerate(raw)
        ]
    if not items:
        raise DataValidationError(f"{json_path}: no volumes in {[key for key, _ in lists]}")
    for key, number, item, labelled in items:
        if not isinstance(item, Mapping) or "image" not in item or (labelled and "label" not in item):
            raise DataValidationError(
                f"{json_path}: {key} item {number} needs 'image'{' and label' * labelled}"
            )
    if site_key is not None:
        lacking = [(key, number) for key, number, item, _ in items if site_key not in item]
        if lacking and missing_site is None:
            counts = ", ".join(f"{n} in {key}" for key, n in Counter(k for k, _ in lacking).items())
            raise DataValidationError(
                f"{json_path}: {len(lacking)} item(s) have no site key {site_key!r} ({counts}; first: "
                f"{lacking[0][0]} item {lacking[0][1]}): add the key, or name the site they belong to "
                "(--missing-site)"
            )
    entries = []
    for _, _, item, labelled in items:
        if site_key is None:
            item_site = default_site
        else:
            item_site = str(item[site_key]) if site_key in item else str(missing_site)
        image = (base / item["image"]).resolve()
        label = (base / item["label"]).resolve() if labelled else None
        entries.append(
            _entry(
                image, label, item_site, str(item.get("patient", _stem(item["image"]))), item.get("frame", 0)
            )
        )
    check_unique_volumes(entries)  # e.g. two folders' case1.nii.gz, both patient 'case1'
    return entries


# Any format --------------------------------------------------------------------------------------


def read_dataset(
    path: str | Path,
    fmt: Format,
    *,
    site: str | None = None,
    site_key: str | None = None,
    cache_dir: str | Path | None = None,
    allow_unlabeled: bool = False,
    unlabelled_keys: Sequence[str] = ("test",),
    missing_site: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read a dataset of any supported format; returns ``(entries, declared labels {name: value})``.

    ``site_key``: M&Ms ``vendor``/``centre`` (default ``vendor``), or the Decathlon item key
    naming the site; not used for ACDC. ``cache_dir``: where M&Ms frames are extracted
    (required for M&Ms). ``allow_unlabeled``: ACDC volumes without ``_gt`` file are accepted.
    ``unlabelled_keys``, ``missing_site``: Decathlon only (see :func:`read_decathlon`).
    """
    if fmt == "acdc":
        if site_key is not None:
            raise DataValidationError("ACDC sites are folders: a site key applies to M&Ms and Decathlon only")
        return read_acdc(path, site=site, allow_unlabeled=allow_unlabeled), dict(ACDC_LABELS)
    if fmt == "mnms":
        if site is not None:
            raise DataValidationError(
                "M&Ms sites come from the information CSV: use a site key (vendor/centre)"
            )
        if cache_dir is None:
            raise DataValidationError("M&Ms needs a cache folder for the extracted ED/ES frames")
        return read_mnms(path, cache_dir, site_key=site_key or "vendor"), dict(ACDC_LABELS)  # type: ignore[arg-type]
    if fmt == "decathlon":
        entries = read_decathlon(
            path, site_key=site_key, site=site, unlabelled_keys=unlabelled_keys, missing_site=missing_site
        )
        return entries, read_decathlon_labels(path)
    raise DataValidationError(f"format {fmt!r}: expected one of {list(FORMATS)}")
