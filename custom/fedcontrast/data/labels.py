"""The label set of a dataset: ``{name: value}``; the one source of class names in the code.

A label set declares every class of the label volumes, background included, with values
``0 .. K-1`` (``0`` the background): the network has ``K`` output channels and channel ``v``
is class ``v``. The bundle derives the same from its ``labels`` config id (``num_classes``,
``class_names``), so a label set given as the ``bundle`` override ``{"labels": ...}`` sets the
network's outputs and the names of every per-class metric. Site datalists carry their
dataset's declared set (``fedcontrast data split``); every site of a job must declare the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from fedcontrast.data.io import save_nifti
from fedcontrast.data.validation import DataValidationError

#: ACDC's (and M&Ms', after remapping; the phantom's) label set.
ACDC_LABELS: dict[str, int] = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}


def class_names(labels: Mapping[str, int]) -> list[str]:
    """The foreground class names in channel order (values above 0, by value)."""
    return [name for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if value > 0]


def check_label_set(labels: Mapping[str, int], source: str) -> dict[str, int]:
    """``labels`` as a plain dict, checked to be a set the network can predict.

    Raises:
        DataValidationError: not ``{name: int}``, fewer than two classes, or values other than
            ``0 .. K-1``; the message names ``source``.
    """
    if not isinstance(labels, Mapping) or not all(isinstance(v, int) for v in labels.values()):
        raise DataValidationError(f"{source}: labels must map class names to integer values, got {labels!r}")
    values = sorted(labels.values())
    if len(values) < 2 or values != list(range(len(values))):
        raise DataValidationError(
            f"{source}: labels must number background 0 and each class 1 .. K-1 once, got {dict(labels)}"
        )
    return {str(name): int(value) for name, value in labels.items()}


def common_label_set(declared: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """The one label set that every source declares (``{source: labels}``, e.g. file -> set).

    Raises:
        DataValidationError: no source, or two sources declare different sets (both named with
            their sets).
    """
    if not declared:
        raise DataValidationError("no label set declared")
    (first, labels), *others = declared.items()
    for source, other in others:
        if dict(other) != dict(labels):
            raise DataValidationError(
                f"mixed label sets: {first} declares {dict(labels)} but {source} declares {dict(other)}; "
                "every site of a job must use the same labels"
            )
    return check_label_set(labels, first)


def merge_classes(
    labels: Mapping[str, int], groups: Sequence[Sequence[str]]
) -> tuple[dict[str, int], dict[int, int]]:
    """Fewer classes from ``labels``: each of ``groups`` (lists of class names) becomes one class,
    numbered ``1 ..`` in the order given and named by its members joined with ``+``; a class in no
    group joins the background.

    Returns:
        the merged label set (``{name: value}``, background 0) and the value map ``{old value: new
        value}`` for every value of ``labels``.

    Raises:
        DataValidationError: a group names no class of ``labels``, the background, or a class that
            another group already holds.
    """
    merged, values = {"background": 0}, {value: 0 for value in labels.values()}
    for new, group in enumerate(groups, start=1):
        if not group:
            raise DataValidationError(f"class group {new} is empty")
        for name in group:
            if name not in labels or labels[name] == 0:
                raise DataValidationError(
                    f"class group {list(group)}: {name!r} is not a foreground class of {dict(labels)}"
                )
            if values[labels[name]]:
                raise DataValidationError(f"class {name!r} is in two class groups")
            values[labels[name]] = new
        merged["+".join(group)] = new
    return check_label_set(merged, f"class groups {[list(g) for g in groups]}"), values


def relabel_file(source: str | Path, target: str | Path, values: Mapping[int, int]) -> Path:
    """Write the label volume ``source`` to ``target`` (atomically, same geometry and data type) with
    every voxel value ``v`` replaced by ``values[v]``.

    Raises:
        DataValidationError: ``source`` holds a value that ``values`` does not map (file and values named).
    """
    image = nib.load(str(source))
    array = np.asarray(image.dataobj)
    found = np.unique(array)
    unmapped = [v.item() for v in found if v != np.round(v) or int(v) not in values]
    if unmapped:
        raise DataValidationError(f"{source}: label values {unmapped} are not among {sorted(values)}")
    relabelled = np.zeros_like(array)
    for old, new in values.items():
        relabelled[array == old] = new
    return save_nifti(target, relabelled, image.affine)
