"""Reading a site datalist (``OUT/<site>.json`` written by ``fedcontrast data split``).

The file is Decathlon style, so ``monai.data.load_decathlon_datalist(path, data_list_key=...)``
also reads its ``training``, ``unlabeled`` and ``test`` lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedcontrast.data.validation import DataValidationError, validate_entries

#: The lists of a site datalist and whether their entries carry labels.
PARTS: dict[str, bool] = {"training": True, "unlabeled": False, "test": True}

#: Value of a training entry's ``"split"`` that holds it out for validation (measured after
#: every round, never trained on).
VALIDATION = "validation"


def held_out(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``entries`` tagged ``"split": "validation"`` (:data:`VALIDATION`)."""
    return [{**e, "split": VALIDATION} for e in entries]


def split_validation(entries: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, validation)``: the entries without and with the :data:`VALIDATION` tag, in order."""
    entries = list(entries)
    validation = [e for e in entries if e.get("split") == VALIDATION]
    return [e for e in entries if e.get("split") != VALIDATION], validation


def load_site_datalist(
    path: str | Path, check_files: bool = True, check_values: bool = False
) -> dict[str, Any]:
    """Read and validate one site datalist.

    Relative ``image``/``label`` paths are resolved against the file's folder; the returned
    dict has absolute paths.

    Args:
        path: the site datalist JSON.
        check_files: check every referenced file's header (exists, readable, 3D, label on the
            image's grid); cheap, no voxels are read.
        check_values: also read every voxel: label values against ``labels``, images finite.

    Returns:
        ``{"site", "labels", "training", "unlabeled", "test", ...}`` as in the file.

    Raises:
        DataValidationError: the file is missing or malformed, or a referenced volume is bad;
            the message names the file.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DataValidationError(f"{path}: site datalist not found")
    try:
        datalist = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataValidationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(datalist, dict):
        raise DataValidationError(f"{path}: expected a JSON object")
    missing = [key for key in ("site", "labels", *PARTS) if key not in datalist]
    if missing:
        raise DataValidationError(f"{path}: missing keys {missing}")
    labels = datalist["labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
        raise DataValidationError(f"{path}: 'labels' must map names to integer values")
    for part, labelled in PARTS.items():
        if not isinstance(datalist[part], list):
            raise DataValidationError(f"{path}: {part!r} must be a list")
        for number, entry in enumerate(datalist[part]):
            needed = ("image", "label") if labelled else ("image",)
            if not isinstance(entry, dict) or any(key not in entry for key in needed):
                raise DataValidationError(f"{path}: {part} entry {number} needs {list(needed)}")
            for key in ("image", "label"):
                if key in entry:
                    entry[key] = str((path.parent / entry[key]).resolve())
        if check_files:
            try:
                validate_entries(datalist[part], labels, check_values=check_values)
            except DataValidationError as exc:
                raise DataValidationError(f"{path} ({part}): {exc}") from exc
    if not datalist["training"] and not datalist["unlabeled"]:
        raise DataValidationError(f"{path}: site {datalist['site']!r} has no training volumes")
    return datalist
