"""Per-site splits: a fixed test set, N labelled training volumes, the rest unlabelled.

Units. ``labeled_per_site`` (N) counts **volumes** (one 3D frame, e.g. a patient's ED or
ES); ``test_per_site`` (T) counts **patients**, all of whose volumes are tested. The split
is made at patient level: a patient is either a test patient or a training patient.

For one seed and site the patients are shuffled once (the order depends on the seed and the
site's name only). The test patients are the first T fully labelled patients in that order,
so the test set does not depend on N. The labelled volumes are taken from the training
patients in a fixed order that visits every patient's first volume (ED) before any
patient's second (ES), so N volumes come from min(N, patients) different patients and the
labelled sets are nested (N=1 within N=2 within ...). Every other training volume is
unlabelled (its label is dropped).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedcontrast.data.io import write_json
from fedcontrast.data.validation import DataValidationError, check_unique_volumes, validate_entries

#: Name of the file listing all site datalists of one split.
INDEX_FILE = "index.json"

_SITE_FILE = re.compile(r"site-\d+\.json")


def site_name(k: int) -> str:
    """The ``k``-th site's name (1-based): ``site-k``, the name of its datalist and NVFlare client."""
    return f"site-{k}"


def site_names(count: int) -> list[str]:
    """``site-1 … site-N``: the names ``fedcontrast data split`` gives the site datalists
    (and NVFlare's simulator its clients).

    Raises:
        ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError(f"need at least one site, got {count}")
    return [site_name(k) for k in range(1, count + 1)]


def _natural_key(name: str) -> list[Any]:
    """Sort key that puts ``site-2`` before ``site-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _by_patient(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Entries grouped by patient, patients in natural order, volumes in reader order.

    Raises:
        DataValidationError: two entries of one site with the same patient and frame (two
            patients under one id would otherwise be merged).
    """
    check_unique_volumes(entries)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(str(entry["patient"]), []).append(entry)
    return {p: groups[p] for p in sorted(groups, key=_natural_key)}


def _shuffled(items: list[str], seed: int, salt: str) -> list[str]:
    """``items`` permuted reproducibly for ``seed`` and ``salt`` (independent of other salts)."""
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    return [items[i] for i in rng.permutation(len(items))]


def deal_to_sites(entries: Sequence[Mapping[str, Any]], n_sites: int, seed: int) -> list[dict[str, Any]]:
    """Deal the patients of a single-site dataset to ``site-1 .. site-K`` reproducibly.

    Patients are shuffled for ``seed`` and dealt round-robin, so site sizes differ by at most one.
    Entries get their new ``site`` and keep the old one as ``source_site``.

    Raises:
        DataValidationError: the dataset has several sites, or fewer patients than sites.
    """
    sources = sorted({str(e["site"]) for e in entries})
    if len(sources) != 1:
        raise DataValidationError(f"sites {sources}: dealing to --sites needs a single-site dataset")
    if n_sites < 1:
        raise DataValidationError(f"--sites {n_sites}: need at least one site")
    patients = _shuffled(list(_by_patient(entries)), seed, "deal")
    if len(patients) < n_sites:
        raise DataValidationError(
            f"site {site_name(len(patients) + 1)!r}: no volumes "
            f"({len(patients)} patients dealt to {n_sites} sites)"
        )
    site_of = {patient: site_name(i % n_sites + 1) for i, patient in enumerate(patients)}
    return [{**e, "site": site_of[str(e["patient"])], "source_site": e["site"]} for e in entries]


def split_site(
    site: str, entries: Sequence[Mapping[str, Any]], labeled: int, test: int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Split one site's entries into ``training`` (labelled), ``unlabeled`` and ``test`` lists.

    Args:
        site: the site's name (seeds its patient order; named in errors).
        entries: the site's reader entries.
        labeled: N, labelled training **volumes**.
        test: T, test **patients** (each with all its volumes, all labelled).
        seed: random seed.

    Raises:
        DataValidationError: the site has no volumes, too few labelled patients for T, no
            training patient left, or fewer labelled training volumes than N.
    """
    if not entries:
        raise DataValidationError(f"site {site!r}: no volumes")
    if labeled < 0 or test < 0:
        raise DataValidationError(f"site {site!r}: label budget and test size must be >= 0")
    groups = _by_patient(entries)
    order = _shuffled(list(groups), seed, site)
    fully_labelled = [p for p in order if all("label" in e for e in groups[p])]
    if test > len(fully_labelled):
        raise DataValidationError(
            f"site {site!r}: test set of {test} patients exceeds its {len(fully_labelled)} labelled patients"
        )
    test_patients = set(fully_labelled[:test])
    train_patients = [p for p in order if p not in test_patients]
    if not train_patients:
        raise DataValidationError(f"site {site!r}: a test set of {test} patients leaves no training patients")
    depth = max(len(groups[p]) for p in train_patients)
    ranked = [groups[p][k] for k in range(depth) for p in train_patients if k < len(groups[p])]
    candidates = [e for e in ranked if "label" in e]
    if labeled > len(candidates):
        raise DataValidationError(
            f"site {site!r}: label budget of {labeled} volumes exceeds its {len(candidates)} labelled "
            f"training volumes ({len(train_patients)} training patients after {test} test patients)"
        )
    chosen = {id(e) for e in candidates[:labeled]}
    keep = ("image", "label", "patient", "frame", "spacing", "cine")
    return {
        "training": [{k: e[k] for k in keep if k in e} for e in candidates[:labeled]],
        "unlabeled": [
            {k: e[k] for k in keep if k in e and k != "label"} for e in ranked if id(e) not in chosen
        ],
        "test": [{k: e[k] for k in keep if k in e} for p in order if p in test_patients for e in groups[p]],
    }


def write_site_splits(
    entries: Sequence[Mapping[str, Any]],
    labels: Mapping[str, int],
    out_dir: str | Path,
    labeled_per_site: int,
    test_per_site: int,
    seed: int = 0,
    sites: int | None = None,
    check_values: bool = True,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Split every site and write ``out_dir/site-k.json`` per site plus ``out_dir/index.json``.

    Sites are renamed ``site-1 .. site-K`` (NVFlare's names) in the natural order of the
    reader's site names (``source_site`` in the files keeps the original name). A site file is::

        {"site": "site-1", "source_site": ..., "seed": 0, "labels": {"background": 0, ...},
         "labeled_per_site": N, "test_per_site": T,
         "training": [...], "unlabeled": [...], "test": [...]}

    with entries ``{"image", "label" (training/test only), "patient", "frame", "spacing"}`` (and
    ``"cine"`` where the reader found the patient's cine series);
    see the module docstring for what N and T count. Everything is validated (pairs, and
    label values and finite images when ``check_values``) before any file is written; each file is written
    atomically, the index last; site files of an earlier split into ``out_dir`` that this
    split does not produce are removed.

    Args:
        entries: reader entries of the whole dataset.
        labels: the declared label set ``{name: value}``.
        out_dir: output folder.
        labeled_per_site: N, labelled training volumes per site.
        test_per_site: T, test patients per site.
        seed: random seed.
        sites: deal the patients of a single-site dataset to this many sites first.
        check_values: read every kept volume: label values against ``labels``, images finite.
        provenance: extra fields for the index (e.g. dataset path and format).

    Returns:
        The index written to ``out_dir/index.json``.

    Raises:
        DataValidationError: any problem, naming the file or site, before anything is written.
    """
    if sites is not None:
        entries = deal_to_sites(entries, sites, seed)
    sources = sorted({str(e["site"]) for e in entries}, key=_natural_key)
    if not sources:
        raise DataValidationError("dataset: no volumes")
    splits = {}
    for k, source in enumerate(sources, start=1):
        site_entries = [e for e in entries if e["site"] == source]
        split = split_site(source, site_entries, labeled_per_site, test_per_site, seed)
        validate_entries(split["training"] + split["test"], labels, check_values=check_values)
        validate_entries(split["unlabeled"], labels, check_values=check_values)
        splits[site_name(k)] = (str(site_entries[0].get("source_site", source)), split)

    out_dir = Path(out_dir).resolve()
    index: dict[str, Any] = {
        **(provenance or {}),
        "seed": seed,
        "labeled_per_site": labeled_per_site,
        "test_per_site": test_per_site,
        "units": {"labeled_per_site": "volumes", "test_per_site": "patients"},
        "labels": dict(labels),
        "sites": {},
    }
    for name, (source, split) in splits.items():
        datalist = {
            "site": name,
            "source_site": source,
            "seed": seed,
            "labels": dict(labels),
            "labeled_per_site": labeled_per_site,
            "test_per_site": test_per_site,
            **split,
        }
        write_json(out_dir / f"{name}.json", datalist)
        index["sites"][name] = {
            "datalist": f"{name}.json",
            "source_site": source,
            **{part: len(split[part]) for part in ("training", "unlabeled", "test")},
            "test_patients": sorted({e["patient"] for e in split["test"]}, key=_natural_key),
        }
    for stale in out_dir.glob("site-*.json"):
        if _SITE_FILE.fullmatch(stale.name) and stale.stem not in splits:
            stale.unlink()
    write_json(out_dir / INDEX_FILE, index)
    return index
