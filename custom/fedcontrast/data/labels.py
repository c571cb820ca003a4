"""The label set of a dataset: ``{name: value}``; the one source of class names in the code.

A label set declares every class of the label volumes, background included, with values
``0 .. K-1`` (``0`` the background): the network has ``K`` output channels and channel ``v``
is class ``v``. The bundle derives the same from its ``labels`` config id (``num_classes``,
``class_names``), so a label set given as the ``bundle`` override ``{"labels": ...}`` sets the
network's outputs and the names of every per-class metric. Site datalists carry their
dataset's declared set (``fedcontrast data split``); every site of a job must declare the same.
"""

from __future__ import annotations

from collections.abc import Mapping

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
