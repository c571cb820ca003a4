"""Result files, markdown reports and plots of a benchmark run (SPEC §7 readouts).

Every JSON file follows the project's results format: ``dataset``, ``config``,
``environment`` and ``rows``. A row is one scored model: (method, fine-tuning mode, label
budget, seed, site) plus ``readout`` (``"finetune"``: the whole network fine-tuned;
``"probe"``: the decoder trained on a frozen encoder), ``finetune_steps`` (optimiser steps at
which it was scored: a unit scores several checkpoints, the last is the budget) and
``eval_split`` (``"test"``, ``"validation"``, or :data:`CROSS_SITE`: a site's locally fine-tuned
model scored on another site's test patients, the row's ``site``; those rows also hold
``trained_site``).

What the label-efficiency report shows, all computed from the rows:

- the headline: method minus random init, paired on seed, site, split and decoder
  initialisation (:mod:`fedcontrast.bench.stats`), mean with a 95% percentile bootstrap
  interval over the (seed, site) pairs, per cell, at the final checkpoint on the test split;
- Dice tables, mean ± std across seeds of the per-seed site mean;
- random init's validation curve (the plateau that fixes the fine-tuning budget);
- Dice against fine-tuning steps at the smallest budget, pre-training curves, bytes;
- cross-site generalisation of local fine-tuning (SPEC §7, :func:`cross_site_rows`);
- the verdict on the project's target (:data:`TARGET`).

A cell that holds fewer seeds than the run (an unfinished run) says so: ``(k of n seeds)``.

Several run folders of one configuration (a method added later runs as its own column) are
merged by :func:`merge_runs`; it refuses folders whose settings differ.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcontrast.bench.environment import run_environment
from fedcontrast.bench.stats import meets_target, paired_differences, summarise, values_summary

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fedcontrast.bench.protocol import BenchConfig

RANDOM_INIT = "random_init"
MODES = ("local", "federated")
#: Readouts in report order; rows without ``readout`` are full fine-tuning (the old protocol).
READOUTS = ("finetune", "probe")
READOUT_TITLES = {"finetune": "full fine-tuning", "probe": "frozen-encoder probe (decoder only)"}
#: ``eval_split`` of a row that scores one site's locally fine-tuned model on another site's test
#: patients (the row's ``site``; the model's site is its ``trained_site``).
CROSS_SITE = "cross_site"
#: The project's target (issue 10): method minus random init at budget N, in every mode.
TARGET = {"method": "fcl", "n_labeled": 1, "difference": 0.05, "readout": "finetune", "modes": MODES}
#: The bench's supervised-ceiling column (``fedcontrast.bench.protocol.SUPERVISED_CEILING``: encoder
#: pre-trained with every pre-training volume's label), the bound the target method is read against.
CEILING = "supervised_ceiling"
#: Random init has reached its plateau when its validation Dice gains less than this over the
#: second half of the fine-tuning budget.
PLATEAU_TOLERANCE = 0.01
#: Missing units listed in the report's text (``results.json`` holds all).
SHOWN_MISSING = 20
PRETRAIN_METRICS = ("loss", "alignment", "uniformity", "partition_accuracy")
#: Method-against-method questions the report answers where both columns ran:
#: (method, baseline, the question a positive difference answers yes to).
COMPARISONS = (
    ("fcl+decoder", "fcl", "decoder pre-training help FCL (SPEC §4)"),
    ("local_cl+decoder", "local_cl", "decoder pre-training help local CL (SPEC §4)"),
    ("fedmoco", "fcl", "FedMoCo beat FCL"),
    ("fedmoco", "fedsimclr", "FedMoCo beat FedSimCLR"),
    ("fedmoco", "fedmoco_nometa", "FedMoCo's metadata transfer help"),
    ("fedmoco", "fedmoco_norsa", "FedMoCo's RSA aggregation help"),
)

#: SPEC §1, ACDC, Dice averaged over sites (fine-tuning, method) -> {N: Dice}.
PUBLISHED = {
    ("local", "random_init"): {1: 0.280, 2: 0.414, 4: 0.618, 8: 0.766},
    ("local", "fcl"): {1: 0.506, 2: 0.631, 4: 0.745, 8: 0.824},
    ("federated", "random_init"): {1: 0.445, 2: 0.572, 4: 0.764, 8: 0.834},
    ("federated", "fedsimclr"): {1: 0.395, 2: 0.576, 4: 0.788, 8: 0.859},
    ("federated", "fcl"): {1: 0.646, 2: 0.824, 4: 0.871, 8: 0.894},
}
RESULT_KEYS = [
    "method",
    "finetune",
    "n_labeled",
    "seed",
    "site",
    "dice_mean",
    "dice",
    "hd95_mean",
    "pretrain_bytes_up",
    "pretrain_bytes_down",
    "bytes_by_kind",
    "pretrain_wall_s",
    "finetune_wall_s",
    "peak_rss_mb",
    "finetune_steps",
    "readout",
    "eval_split",
]

Row = dict[str, Any]


# ----------------------------------------------------------------------------- inputs


def config_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain JSON data (a dataclass, or any object with attributes)."""
    data = asdict(config) if is_dataclass(config) else dict(vars(config))
    return json.loads(json.dumps(data))


def normalise_rows(rows: Iterable[Row], config: Any = None) -> list[Row]:
    """Copies of ``rows`` with ``readout``, ``eval_split`` and ``finetune_steps`` filled in.

    Rows of the old protocol have none of them: they are full fine-tuning, scored on test,
    at ``config.finetune_steps`` when that is a number (else ``None``: unknown).

    Raises:
        ValueError: a row lacks a results-format key the report needs; names the key and row.
    """
    steps = getattr(config, "finetune_steps", None)
    default_steps = steps if isinstance(steps, int) else None
    out = []
    for row in rows:
        missing = [
            k for k in ("method", "finetune", "n_labeled", "seed", "site", "dice_mean") if k not in row
        ]
        if missing:
            raise ValueError(f"row {row.get('unit', row)} lacks {', '.join(missing)}")
        out.append(
            {
                "readout": "finetune",
                "eval_split": "test",
                "finetune_steps": default_steps,
                **row,
            }
        )
    return out


def class_names(rows: Iterable[Row]) -> list[str]:
    """The foreground classes named by the rows' ``dice`` keys, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("dice") or {}))
    return list(names)


def load_rows_file(path: Path) -> list[Row]:
    """Rows of a ``rows.jsonl`` file (one JSON object a line); ``[]`` when it does not exist.

    Raises:
        ValueError: a line is not valid JSON; names the file and line.
    """
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not a JSON row ({err})") from err
    return rows


def check_same_defaults(run_dirs: Sequence[Path]) -> None:
    """Refuse run folders that recorded different defaults for a method they share (a folder
    without a record, run before they were kept, is not checked).

    Raises:
        ValueError: names the folder, the earlier one it disagrees with and each default that differs.
    """
    from fedcontrast.bench.protocol import changed_defaults

    seen: dict[str, dict[str, Any]] = {}
    recorded_in: dict[str, Path] = {}
    for folder in run_dirs:
        defaults = recorded_defaults([folder])
        for method in set(defaults) & set(seen):
            changed = changed_defaults({method: seen[method]}, {method: defaults[method]})
            if changed:
                raise ValueError(
                    f"{recorded_in[method]} and {folder} were run with other method defaults "
                    f"({'; '.join(changed)}); only runs of one configuration can be merged"
                )
        recorded_in.update({m: folder for m in defaults if m not in seen})
        seen = {**defaults, **seen}


def merge_runs(run_dirs: Sequence[Path]) -> tuple[dict[str, Any], list[Row], dict[str, Any]]:
    """Settings, rows and provenance of one or more run folders of the same configuration.

    Each folder holds ``bench_config.json`` and ``rows.jsonl``. The settings must be equal
    apart from ``methods`` (a method added later runs as its own column). A method found in
    several folders (random init is usually run with every new column) is taken from the
    first folder that has it; how far its rows in the later folders lie from those taken is
    recorded (a reproducibility check).

    Returns:
        ``(config, rows, provenance)``: the first folder's settings with ``methods`` the union
        in order of appearance; the rows; ``{"sources": {method: folder}, "duplicates":
        {method: {"folders": [...], "max_abs_dice_difference": float | None}}}``.

    Raises:
        ValueError: no folder, a folder without ``bench_config.json``, or settings that
            differ (names both folders and the keys), or recorded method defaults that differ
            (:func:`~fedcontrast.bench.protocol.record_method_defaults`; a folder run before they
            were recorded is not checked).
    """
    if not run_dirs:
        raise ValueError("no run folder given")
    configs = []
    for folder in run_dirs:
        file = Path(folder) / "bench_config.json"
        if not file.exists():
            raise ValueError(f"{folder} is not a benchmark run folder (no bench_config.json)")
        configs.append(json.loads(file.read_text()))
    first = configs[0]
    for folder, config in zip(run_dirs[1:], configs[1:]):
        differ = sorted(
            k for k in set(first) | set(config) if k != "methods" and first.get(k) != config.get(k)
        )
        if differ:
            raise ValueError(
                f"{run_dirs[0]} and {folder} were run with different settings ({', '.join(differ)}); "
                "only runs of one configuration can be merged"
            )
    check_same_defaults(run_dirs)
    methods: list[str] = []
    for config in configs:
        methods += [m for m in config.get("methods", []) if m not in methods]
    sources: dict[str, str] = {}
    taken: dict[tuple, float] = {}
    rows: list[Row] = []
    duplicates: dict[str, dict[str, Any]] = {}
    for folder in run_dirs:
        by_method: dict[str, list[Row]] = defaultdict(list)
        for row in load_rows_file(Path(folder) / "rows.jsonl"):
            by_method[row["method"]].append(row)
        for method, method_rows in by_method.items():
            if method not in sources:
                sources[method] = str(folder)
                rows += method_rows
                taken.update({_row_key(r): r["dice_mean"] for r in method_rows})
                continue
            entry = duplicates.setdefault(method, {"folders": [], "max_abs_dice_difference": None})
            entry["folders"].append(str(folder))
            gaps = [
                abs(r["dice_mean"] - taken[_row_key(r)])
                for r in method_rows
                if _row_key(r) in taken and _finite(r["dice_mean"]) and _finite(taken[_row_key(r)])
            ]
            if gaps:
                entry["max_abs_dice_difference"] = max([*gaps, entry["max_abs_dice_difference"] or 0.0])
    return {**first, "methods": methods}, rows, {"sources": sources, "duplicates": duplicates}


def _row_key(row: Row) -> tuple:
    keys = (
        "method",
        "seed",
        "site",
        "trained_site",
        "finetune",
        "n_labeled",
        "readout",
        "finetune_steps",
        "eval_split",
    )
    return tuple(row.get(k) for k in keys)


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _run_dirs(run_dir: Path | Sequence[Path]) -> list[Path]:
    return [Path(run_dir)] if isinstance(run_dir, str | Path) else [Path(d) for d in run_dir]


def load_pretrain_records(run_dirs: Sequence[Path], methods: Iterable[str]) -> dict[str, list[dict]]:
    """method -> its saved pre-training records (``pretrain/<method>_s<seed>/record.json``).

    Each method's records come from the first run folder that has any.
    """
    records: dict[str, list[dict]] = {}
    for method in methods:
        for folder in run_dirs:
            files = sorted((Path(folder) / "pretrain").glob(f"{method}_s*/record.json"))
            if files:
                records[method] = [json.loads(f.read_text()) for f in files]
                break
    return records


def dataset_info(config: Any, run_dir: Path) -> dict[str, Any]:
    """What the run used: the phantom's description (or the dataset folder) and the split."""
    settings = config_dict(config)
    phantom = Path(run_dir) / "data" / "phantom.json"
    info: dict[str, Any] = {"name": "fedcontrast phantom" if phantom.exists() else str(run_dir)}
    for key in ("sites", "patients_per_site", "test_per_site", "validation_per_site", "data_seed", "size"):
        if key in settings:
            info[key] = settings[key]
    if "patients_per_site" in settings:
        info["volumes_per_site"] = 2 * settings["patients_per_site"]
    if phantom.exists():
        summary = json.loads(phantom.read_text())
        info["image_size"] = summary.get("sites") or summary.get("scanners") or summary
    return info


def recorded_defaults(run_dirs: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """The defaults of the methods the run folders used, as they recorded them
    (:func:`~fedcontrast.bench.protocol.record_method_defaults`; a method from the first folder
    that has it, as :func:`merge_runs` takes its rows); ``{}`` where no folder recorded any."""
    from fedcontrast.bench.protocol import METHOD_DEFAULTS_FILE

    merged: dict[str, dict[str, Any]] = {}
    for file in (Path(folder) / METHOD_DEFAULTS_FILE for folder in run_dirs):
        if file.exists():
            merged = {**json.loads(file.read_text()), **merged}
    return merged


def result_document(rows: list[Row], config: Any, run_dir: Path | Sequence[Path]) -> dict[str, Any]:
    """The results-format object for ``rows`` (:data:`RESULT_KEYS` of each row), with the
    methods' defaults beside the settings given (``method_defaults``: they change the numbers too)."""
    first = _run_dirs(run_dir)[0]
    rows = normalise_rows(rows, config)
    return {
        "dataset": dataset_info(config, first),
        "config": config_dict(config),
        "method_defaults": recorded_defaults(_run_dirs(run_dir)),
        "environment": run_environment(_run_dirs(run_dir)),
        "rows": [
            {k: row.get(k) for k in RESULT_KEYS}
            | ({"trained_site": row["trained_site"]} if "trained_site" in row else {})
            for row in rows
        ],
    }


def dump_document(document: dict[str, Any]) -> str:
    """``document`` as JSON: indented, except that each of its ``rows`` is one line (thousands of rows)."""
    head = json.dumps({k: v for k, v in document.items() if k != "rows"}, indent=1)
    body = ",\n".join("  " + json.dumps(row) for row in document.get("rows", []))
    return head[: -len("\n}")] + ',\n "rows": [\n' + body + "\n ]\n}\n"


# ----------------------------------------------------------------------------- selection


def final_steps(rows: Iterable[Row]) -> dict[tuple[str, str], int | None]:
    """(mode, readout) -> the fine-tuning budget: the largest ``finetune_steps`` on test rows."""
    steps: dict[tuple[str, str], int | None] = {}
    for row in rows:
        if row["eval_split"] != "test":
            continue
        key = row["finetune"], row["readout"]
        value = row["finetune_steps"]
        if key not in steps or (value is not None and (steps[key] is None or value > steps[key])):
            steps[key] = value
    return steps


def headline_rows(rows: Iterable[Row], split: str = "test") -> list[Row]:
    """Rows scored at the final checkpoint of their (mode, readout) on ``split``."""
    rows = list(rows)
    budget = final_steps(rows)
    return [
        r
        for r in rows
        if r["eval_split"] == split and r["finetune_steps"] == budget.get((r["finetune"], r["readout"]))
    ]


def document_rows(rows: Iterable[Row], n_curve: int) -> list[Row]:
    """The rows a results file keeps: enough to redraw every table and figure of the report.

    Test rows at the final checkpoint, every checkpoint on test at ``n_curve`` labelled volumes
    (the learning curves), random init's validation rows (its plateau) and the cross-site rows.
    The run folder's ``rows.jsonl`` keeps the rest (other methods' validation rows, intermediate
    checkpoints).
    """
    rows = list(rows)
    budget = final_steps(rows)
    return [
        r
        for r in rows
        if (
            r["eval_split"] == "test"
            and (
                r["finetune_steps"] == budget.get((r["finetune"], r["readout"])) or r["n_labeled"] == n_curve
            )
        )
        or (r["method"] == RANDOM_INIT and r["eval_split"] == "validation")
        or r["eval_split"] == CROSS_SITE
    ]


def cross_site_rows(rows: Iterable[Row]) -> list[Row]:
    """Cross-site generalisation (SPEC §7) as one row per locally fine-tuned model.

    Each model (method, seed, N, the site that trained it), at the final checkpoint, gets the mean
    of its Dice over the other sites' test patients (:data:`CROSS_SITE` rows). The row's ``site``
    is the site that trained it, so it pairs with random init's model of the same seed, site and
    decoder initialisation exactly like a headline row; ``tested_sites`` counts the sites averaged.
    """
    rows = list(rows)
    budget = final_steps(rows)
    grouped: dict[tuple, list[float]] = defaultdict(list)
    keys = ("method", "seed", "trained_site", "finetune", "readout", "n_labeled", "finetune_steps")
    for row in rows:
        if row["eval_split"] == CROSS_SITE and row["finetune_steps"] == budget.get(
            (row["finetune"], row["readout"])
        ):
            grouped[tuple(row[k] for k in keys)].append(row["dice_mean"])
    out = []
    for key, dice in grouped.items():
        model = dict(zip(keys, key))
        model["site"] = model.pop("trained_site")
        out.append(
            {
                **model,
                "eval_split": CROSS_SITE,
                "dice_mean": float(np.nanmean(dice)),
                "tested_sites": len(dice),
            }
        )
    return out


def cells(rows: Iterable[Row]) -> dict[tuple[str, str, str, int], list[Row]]:
    """(mode, readout, method, N) -> rows."""
    grouped: dict[tuple[str, str, str, int], list[Row]] = defaultdict(list)
    for row in rows:
        grouped[row["finetune"], row["readout"], row["method"], row["n_labeled"]].append(row)
    return grouped


def difference_cells(
    rows: list[Row], methods: Sequence[str], n_boot: int = 10_000
) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """(mode, readout, method, N) -> :func:`~fedcontrast.bench.stats.summarise` of the paired
    differences method minus random init on ``rows`` (already one checkpoint and split)."""
    out = {}
    for method in methods:
        if method == RANDOM_INIT:
            continue
        grouped: dict[tuple[str, str, str, int], list[dict]] = defaultdict(list)
        for pair in paired_differences(rows, method):
            grouped[pair["finetune"], pair["readout"], method, pair["n_labeled"]].append(pair)
        out.update({key: summarise(pairs, n_boot=n_boot) for key, pairs in grouped.items()})
    return out


def comparison_cells(
    rows: list[Row], methods: Sequence[str], n_boot: int = 10_000
) -> dict[tuple[str, str, str, str, int], dict[str, Any]]:
    """(method, baseline, mode, readout, N) -> :func:`~fedcontrast.bench.stats.summarise` of the
    paired differences method minus baseline, for the :data:`COMPARISONS` whose two columns ran."""
    grouped: dict[tuple[str, str, str, str, int], list[dict]] = defaultdict(list)
    for method, baseline, _ in COMPARISONS:
        if method in methods and baseline in methods:
            for pair in paired_differences(rows, method, baseline):
                grouped[method, baseline, pair["finetune"], pair["readout"], pair["n_labeled"]].append(pair)
    return {key: summarise(pairs, n_boot=n_boot) for key, pairs in grouped.items()}


def cell_records(cells: dict[tuple[str, str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """``results.json`` entries of (mode, readout, method, N) cells: the key's fields plus the summary."""
    return [
        {"finetune": k[0], "readout": k[1], "method": k[2], "n_labeled": k[3], **v}
        for k, v in sorted(cells.items(), key=repr)
    ]


def cross_site_section(
    differences: dict[tuple[str, str, str, int], dict[str, Any]],
    values: dict[tuple[str, str, str, int], dict[str, Any]],
    methods: Sequence[str],
    budgets: Sequence[int],
    seeds: int,
) -> list[str]:
    """Markdown lines of the cross-site generalisation section (:func:`cross_site_rows`' cells)."""
    key = ("local", "finetune")
    return [
        "Each site's locally fine-tuned model (full fine-tuning, last checkpoint), with the BatchNorm "
        "statistics of its own training volumes, scored on every other site's test patients; its mean "
        "Dice over them is one value per (seed, site that trained it).\n",
        "\n### Method minus random init, paired on seed and training site (95% bootstrap)\n",
        grid_table(differences, key, methods, budgets, with_seed_count(format_difference, seeds)),
        "\n### Mean Dice on the other sites, mean ± std across seeds\n",
        grid_table(values, key, methods, budgets, with_seed_count(format_value, seeds)),
    ]


def _seed_count(seeds: int) -> str:
    return f" ({seeds} seed{'s' if seeds != 1 else ''})"


def comparison_section(
    comparisons: dict[tuple[str, str, str, str, int], dict[str, Any]], budgets: Sequence[int]
) -> list[str]:
    """Markdown lines: one table per comparison that ran, rows (mode, readout), columns N."""
    lines = []
    for method, baseline, question in COMPARISONS:
        labelled = {
            (method, baseline, f"{mode}, {READOUT_TITLES.get(readout, readout)}", n): summary
            for (m, b, mode, readout, n), summary in sorted(
                comparisons.items(), key=lambda kv: (kv[0][3], MODES.index(kv[0][2]), kv[0][4])
            )
            if (m, b) == (method, baseline)
        }
        if labelled:
            rows = list(dict.fromkeys(key[2] for key in labelled))
            lines += [
                f"\n### {method} minus {baseline}: does {question}?\n",
                grid_table(
                    labelled,
                    (method, baseline),
                    rows,
                    budgets,
                    lambda s: format_difference(s) + _seed_count(s["n_seeds"]) if s else "—",
                    row_title="fine-tuning",
                ),
            ]
    if lines:
        lines.insert(
            0,
            "Paired as the headline (same seed, site, split, decoder initialisation), 95% bootstrap "
            "interval over the (seed, site) pairs; a cell whose interval lies above 0 answers yes.\n",
        )
    return lines


def value_cells(
    rows: list[Row], value: Callable[[Row], float | None] = lambda r: r["dice_mean"], n_boot: int = 10_000
) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """(mode, readout, method, N) -> :func:`~fedcontrast.bench.stats.values_summary` of ``value``."""
    return {key: values_summary(group, value, n_boot) for key, group in cells(rows).items()}


def target_verdict(
    differences: dict[tuple[str, str, str, int], dict[str, Any]], initial_encoder: str = ""
) -> dict[str, Any]:
    """Whether :data:`TARGET` is met, per mode and overall, from the headline differences.

    A run whose pre-training started from an encoder file (``initial_encoder`` in its
    ``pretrain_overrides``) does not measure the method from scratch: its verdict is not met,
    with ``not_applicable`` naming the file. A run without paired rows of the target method at
    its budget (no such column, e.g. a run of other methods) has ``measured`` False: not met,
    and not evidence against the target either.
    """
    per_mode = {}
    for mode in TARGET["modes"]:
        summary = differences.get((mode, TARGET["readout"], TARGET["method"], TARGET["n_labeled"]))
        per_mode[mode] = {
            "summary": summary,
            "met": bool(summary and meets_target(summary, TARGET["difference"])) and not initial_encoder,
        }
    verdict = {
        "target": dict(TARGET),
        "per_mode": per_mode,
        "met": all(v["met"] for v in per_mode.values()),
        "measured": any(v["summary"] and v["summary"]["n_pairs"] for v in per_mode.values()),
    }
    if initial_encoder:
        verdict["not_applicable"] = f"pre-training started from the encoder file {initial_encoder}"
    return verdict


def verdict_line(verdict: dict[str, Any]) -> str:
    """The report's one-line verdict on the target, every number computed."""
    target = verdict["target"]
    parts = []
    for mode, result in verdict["per_mode"].items():
        summary = result["summary"]
        if not summary or not summary["n_pairs"]:
            parts.append(f"{mode}: no paired rows")
        else:
            parts.append(
                f"{mode}: {format_difference(summary)}, {'met' if result['met'] else 'not met'} "
                + (
                    f"(whole seeds resampled: [{summary['seed_ci_low']:.3f}, {summary['seed_ci_high']:.3f}])"
                    if summary["n_seeds"] > 1
                    else "(one seed)"
                )
            )
    if "not_applicable" in verdict:
        outcome = "not applicable"
        reason = (
            f"; {verdict['not_applicable']} (`initial_encoder`), not from scratch, so these differences "
            "do not measure the method"
        )
    elif not verdict["measured"]:
        outcome = "not measured by this run"
        reason = f"; it has no {target['method']} column paired with random init at N={target['n_labeled']}"
    else:
        outcome = "met" if verdict["met"] else "not met"
        reason = ""
    return (
        f"**Target: {target['method'].upper()} minus random init at N={target['n_labeled']} >= "
        f"+{target['difference']:.2f} with the 95% interval above 0, in "
        f"{' and '.join(target['modes'])} fine-tuning: {outcome}** "
        f"({'; '.join(parts)}{reason})."
    )


def ceiling_share(differences: dict[tuple[str, str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, readout) at the target budget, the target method's and the supervised ceiling's
    differences from random init and their ratio (``share``: None where the ceiling's mean is not
    above 0); [] when the run has no :data:`CEILING` column."""
    shares = []
    for (mode, readout, method, n), ceiling in sorted(differences.items()):
        target = differences.get((mode, readout, TARGET["method"], n))
        if method != CEILING or n != TARGET["n_labeled"] or not target or not ceiling["n_pairs"]:
            continue
        share = target["mean"] / ceiling["mean"] if ceiling["mean"] > 0 else None
        shares.append(
            {"finetune": mode, "readout": readout, "method": target, "ceiling": ceiling, "share": share}
        )
    return shares


def ceiling_paragraph(shares: list[dict[str, Any]]) -> str:
    """The report's sentence on how much of the supervised ceiling the target method reaches."""
    name = TARGET["method"].upper()
    parts = [
        f"{s['finetune']} {READOUT_TITLES.get(s['readout'], s['readout'])}: {name} "
        f"{format_difference(s['method'])} of the ceiling's {format_difference(s['ceiling'])}"
        + (f" ({s['share']:.0%})" if s["share"] is not None else "")
        for s in shares
    ]
    return (
        f"Against the supervised ceiling (`{CEILING}`: the encoder pre-trained with every pre-training "
        "volume's label, the same steps; a bound on what pre-training the encoder can add here, not a "
        f"method), {name} minus random init at N={TARGET['n_labeled']}: " + "; ".join(parts) + "."
    )


def plateau_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Random init's validation Dice against fine-tuning steps, per (mode, readout, N).

    Each entry: ``mode``, ``readout``, ``n_labeled``, ``steps`` (checkpoints), ``dice`` (mean over
    seeds and sites at each), ``budget`` (the last checkpoint), ``half_steps`` (the last
    checkpoint at or before half of it, or ``None``), ``gain`` (the rise over the second half:
    the least-squares line through the checkpoints from ``half_steps`` to the budget, times
    ``budget - half_steps``, so that one noisy checkpoint does not decide it; with two
    checkpoints, their difference) and ``plateau`` (``gain < PLATEAU_TOLERANCE``; ``None`` when
    unmeasured).
    """
    curves: dict[tuple[str, str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (
            row["method"] == RANDOM_INIT
            and row["eval_split"] == "validation"
            and row["finetune_steps"] is not None
            and _finite(row["dice_mean"])
        ):
            curves[row["finetune"], row["readout"], row["n_labeled"]][row["finetune_steps"]].append(
                row["dice_mean"]
            )
    out = []
    for (mode, readout, n), by_step in sorted(curves.items(), key=lambda kv: _order(kv[0])):
        steps = sorted(by_step)
        dice = [float(np.mean(by_step[s])) for s in steps]
        budget = steps[-1]
        earlier = [s for s in steps if s <= budget / 2]
        half = earlier[-1] if earlier else None
        gain = None
        if half is not None:
            second = steps.index(half)
            slope = np.polyfit(steps[second:], dice[second:], 1)[0]
            gain = float(slope * (budget - half))
        out.append(
            {
                "mode": mode,
                "readout": readout,
                "n_labeled": n,
                "steps": steps,
                "dice": dice,
                "budget": budget,
                "half_steps": half,
                "gain": gain,
                "plateau": None if gain is None else bool(gain < PLATEAU_TOLERANCE),
            }
        )
    return out


def _order(key: tuple[str, str, int]) -> tuple:
    mode, readout, n = key
    return (
        MODES.index(mode) if mode in MODES else len(MODES),
        READOUTS.index(readout) if readout in READOUTS else len(READOUTS),
        n,
    )


def learning_curves(
    rows: list[Row], n_labeled: int, split: str = "test", readout: str = "finetune"
) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """(mode, method) -> steps -> :func:`values_summary` of Dice at ``n_labeled`` on ``split``."""
    grouped: dict[tuple[str, str], dict[int, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (
            row["n_labeled"] == n_labeled
            and row["eval_split"] == split
            and row["readout"] == readout
            and row["finetune_steps"] is not None
        ):
            grouped[row["finetune"], row["method"]][row["finetune_steps"]].append(row)
    return {
        key: {s: values_summary(group, n_boot=1000) for s, group in sorted(by_step.items())}
        for key, by_step in grouped.items()
    }


def pretrain_curves(records: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """method -> per-round means (over seeds and sites) of :data:`PRETRAIN_METRICS`, plus throughput.

    Uses each record's ``curve`` (per-round dicts with ``round``, ``step``, ``site`` and any of
    the metrics). Site entries are averaged; a metric that only ``site == "global"`` entries
    carry is taken from those. Returns ``{"rounds": [...], metric: [...] (NaN where absent),
    "steps": [...], "samples_per_s": float | None, "seeds": int}``; methods without a curve are
    left out.
    """
    out = {}
    for method, recs in records.items():
        entries = [e for rec in recs for e in rec.get("curve") or []]
        if not entries:
            continue
        rounds = sorted({e["round"] for e in entries})
        summary: dict[str, Any] = {"rounds": rounds, "seeds": len(recs)}
        for metric in (*PRETRAIN_METRICS, "step"):
            series = []
            for r in rounds:
                at = [e for e in entries if e["round"] == r and _finite(e.get(metric))]
                local = [e[metric] for e in at if e.get("site") != "global"]
                series.append(float(np.mean(local or [e[metric] for e in at])) if at else float("nan"))
            summary["steps" if metric == "step" else metric] = series
        rates = [rec["samples_per_s"] for rec in recs if _finite(rec.get("samples_per_s"))]
        summary["samples_per_s"] = float(np.mean(rates)) if rates else None
        out[method] = summary
    return out


def missing_by_budget(missing: list[str]) -> dict[int, int]:
    """How many of the ``method|seed|mode|N|readout`` unit keys ``missing`` fall on each N."""
    counts: dict[int, int] = defaultdict(int)
    for key in missing:
        counts[int(key.split("|")[3])] += 1
    return dict(counts)


def missing_units(rows: list[Row], config: Any) -> list[str]:
    """Units of the configured grid without rows (an interrupted or partial run).

    A unit is ``method|seed|mode|N|readout`` (the protocol's unit key): every mode and budget
    for full fine-tuning; for each other readout of ``config.readouts``, the modes of
    ``config.probe_modes`` and budgets of ``config.probe_budgets`` (default: all). Rows without
    a ``readout`` key come from the old protocol, which had full fine-tuning only: then only
    ``method|seed|mode|N`` is checked.
    """
    settings = config_dict(config)
    readouts = settings.get("readouts", ["finetune"]) if any("readout" in r for r in rows) else [None]
    probe_modes = settings.get("probe_modes", list(MODES))
    probe_budgets = settings.get("probe_budgets", settings.get("budgets", []))
    done = {(r["method"], r["seed"], r["finetune"], r["n_labeled"], r.get("readout")) for r in rows}
    return [
        "|".join(map(str, (m, s, mode, n, readout) if readout else (m, s, mode, n)))
        for n in sorted(settings.get("budgets", []))
        for s in settings.get("seeds", [])
        for m in settings.get("methods", [])
        for readout in readouts
        for mode in MODES
        if readout in (None, "finetune") or (mode in probe_modes and n in probe_budgets)
        if (m, s, mode, n, readout) not in done
    ]


def scored_cells(values: Mapping[tuple, Any], readouts: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(mode, readout)`` pairs with at least one value keyed ``(mode, readout, ...)``.

    Readouts outer, modes inner; a pair without values (a probe run in one mode only) is left out.
    """
    return [
        (mode, readout)
        for readout in readouts
        for mode in MODES
        if any(key[:2] == (mode, readout) for key in values)
    ]


# ----------------------------------------------------------------------------- formatting


def format_difference(summary: dict[str, Any] | None) -> str:
    """``+0.052 [0.021, 0.080]``; ``—`` without pairs."""
    if not summary or not summary["n_pairs"]:
        return "—"
    return f"{summary['mean']:+.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"


def with_seed_count(
    fmt: Callable[[dict[str, Any] | None], str], seeds: int
) -> Callable[[dict[str, Any] | None], str]:
    """``fmt``, followed by ``(k of seeds seeds)`` in a cell that holds fewer than the configured
    ``seeds`` (an unfinished run), so a partial cell never reads as a complete one."""

    def cell(summary: dict[str, Any] | None) -> str:
        text = fmt(summary)
        if summary and summary["n_pairs"] and summary["n_seeds"] < seeds:
            text += f" ({summary['n_seeds']} of {seeds} seeds)"
        return text

    return cell


def format_value(summary: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.452 ± 0.031`` (mean ± std across seeds); ``(1 seed)`` in place of the std; ``—`` when empty."""
    if not summary or not summary["n_pairs"]:
        return "—"
    spread = summary["std_seeds"]
    tail = f" ± {spread:.{digits}f}" if _finite(spread) else " (1 seed)"
    return f"{summary['mean']:.{digits}f}{tail}"


def grid_table(
    summaries: dict[tuple, dict[str, Any]],
    prefix: tuple,
    methods: Sequence[str],
    budgets: Sequence[int],
    formatter: Callable[[dict[str, Any] | None], str],
    row_title: str = "method",
) -> str:
    """Markdown: ``methods`` as rows, N as columns, ``formatter(summaries[(*prefix, method, N)])``."""
    lines = [
        f"| {row_title} | " + " | ".join(f"N={n}" for n in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in methods:
        row = [formatter(summaries.get((*prefix, method, n))) for n in budgets]
        if any(c != "—" for c in row):
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def table(
    rows: list[Row],
    mode: str,
    methods: Sequence[str],
    budgets: Sequence[int],
    value: Callable[[Row], float | None],
) -> str:
    """Markdown of ``value`` at the final test checkpoint of full fine-tuning in ``mode``: methods as
    rows, N as columns, mean ± std across seeds of the per-seed site mean."""
    selected = [r for r in headline_rows(normalise_rows(rows)) if r["readout"] == "finetune"]
    return grid_table(value_cells(selected, value, 1), (mode, "finetune"), methods, budgets, format_value)


def ranking(rows: list[Row], mode: str, n: int, methods: Sequence[str]) -> list[str]:
    """Methods ordered by mean Dice (best first) at one (mode, N), full fine-tuning, final test rows."""
    selected = [r for r in headline_rows(normalise_rows(rows)) if r["readout"] == "finetune"]
    grouped = cells(selected)
    scored = [
        (float(np.nanmean([r["dice_mean"] for r in grouped[mode, "finetune", m, n]])), m)
        for m in methods
        if grouped.get((mode, "finetune", m, n))
    ]
    return [m for _, m in sorted(scored, reverse=True)]


def ordering_sentences(rows: list[Row], budgets: Sequence[int], methods: Sequence[str]) -> list[str]:
    """Per column, our ordering against the published one (SPEC §1) for the methods both have."""
    sentences = []
    for mode in MODES:
        for n in budgets:
            published = [m for m in methods if n in PUBLISHED.get((mode, m), {})]
            if len(published) < 2:
                continue
            ours = [m for m in ranking(rows, mode, n, methods) if m in published]
            if len(ours) < len(published):
                continue
            theirs = sorted(published, key=lambda m: -PUBLISHED[mode, m][n])
            verdict = "the same ordering" if ours == theirs else "a different ordering"
            sentences.append(
                f"{mode} fine-tuning, N={n}: here {' > '.join(ours) or 'no data'}; published "
                f"{' > '.join(theirs)} ({verdict})."
            )
    firsts = [s for s in sentences if s.split("here ", 1)[1].startswith("fcl ")]
    if sentences and any("fcl" in s for s in sentences):
        columns = len(sentences)
        sentences.append(f"FCL ranks first in {len(firsts)} of {columns} such columns (published: all).")
    return sentences


def byte_kinds(rows: Iterable[Row]) -> list[str]:
    """Message kinds named by the rows' ``bytes_by_kind`` keys (``<kind>_up``/``<kind>_down``), in order."""
    kinds: dict[str, None] = {}
    for row in rows:
        kinds.update(dict.fromkeys(k.rsplit("_", 1)[0] for k in row.get("bytes_by_kind") or {}))
    return list(kinds) or ["weights", "target", "features"]


def bytes_table(rows: list[Row], methods: Sequence[str]) -> str:
    """Per method: mean per-site pre-training bytes by kind (MB), wall times and peak memory."""
    kinds = byte_kinds(rows)
    header = ["method", *(f"{k} {d} (MB)" for k in kinds for d in ("up", "down"))]
    header += ["pre-train wall (s)", "fine-tune wall (s)", "peak RSS of a unit (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        cells_ = [
            f"{np.mean([r['bytes_by_kind'].get(f'{k}_{d}', 0) for r in sel]) / 1e6:.2f}"
            for k in kinds
            for d in ("up", "down")
        ]
        cells_ += [
            f"{np.mean([r['pretrain_wall_s'] for r in sel]):.0f}",
            f"{np.mean([r['finetune_wall_s'] for r in sel]):.0f}",
            f"{max(r['peak_rss_mb'] for r in sel):.0f}",
        ]
        lines.append(f"| {method} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def plateau_section(plateau: list[dict[str, Any]], budgets: dict[tuple[str, str], int | None]) -> list[str]:
    """Markdown: the fine-tuning budgets and random init's validation curve with the plateau test."""
    parts = []
    for (mode, readout), steps in sorted(budgets.items(), key=lambda kv: _order((*kv[0], 0))):
        parts.append(
            f"- {mode} fine-tuning, {READOUT_TITLES.get(readout, readout)}: "
            f"**{steps if steps is not None else 'unknown'} optimiser steps** for every method and budget."
        )
    if not plateau:
        return [*parts, "", "No validation rows of random init: the plateau was not measured."]
    measured = [p for p in plateau if p["plateau"] is not None]
    reached = [p for p in measured if p["plateau"]]
    parts += [
        "",
        f"Random init's mean validation Dice (over seeds and sites) at each checkpoint. Plateau: it gains "
        f"less than {PLATEAU_TOLERANCE} over the second half of the budget (the rise of the least-squares "
        f"line through the second half's checkpoints). Reached in {len(reached)} of "
        f"{len(measured)} measured (mode, readout, N) curves"
        + (
            f"; not measured (no checkpoint at half the budget) in {len(plateau) - len(measured)}"
            if len(measured) < len(plateau)
            else ""
        )
        + ".",
        "",
        "| mode | readout | N | Dice at steps | gain over the second half | plateau |",
        "|---|---|---|---|---|---|",
    ]
    for p in plateau:
        curve = ", ".join(f"{s}: {d:.3f}" for s, d in zip(p["steps"], p["dice"]))
        gain = "—" if p["gain"] is None else f"{p['gain']:+.3f} ({p['half_steps']} -> {p['budget']})"
        status = {None: "not measured", True: "reached", False: "**not reached**"}[p["plateau"]]
        parts.append(f"| {p['mode']} | {p['readout']} | {p['n_labeled']} | {curve} | {gain} | {status} |")
    return parts


def curves_table(curves: dict[str, dict[str, Any]]) -> str:
    """Markdown: per method, each pre-training metric at the first and the last round."""
    header = ["method", "rounds", "steps per site", "samples/s per site"]
    header += [f"{m.replace('_', ' ')} (first -> last)" for m in PRETRAIN_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for method, c in curves.items():
        metrics = [
            " -> ".join(f"{v:.3f}" if _finite(v) else "—" for v in (c[m][0], c[m][-1]))
            if _finite(c[m][0]) or _finite(c[m][-1])
            else "—"
            for m in PRETRAIN_METRICS
        ]
        steps = f"{c['steps'][-1]:.0f}" if _finite(c["steps"][-1]) else "—"
        rate = f"{c['samples_per_s']:.1f}" if c["samples_per_s"] is not None else "—"
        lines.append(f"| {method} | {len(c['rounds'])} | {steps} | {rate} | " + " | ".join(metrics) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output files


#: suffixes of the files a benchmark writes; an ``--out`` given with one of them is taken as its stem
OUTPUT_SUFFIXES = (".json", ".md", ".png")


def output_file(out: Path, suffix: str) -> Path:
    """The file ``out`` names with ``suffix``: the suffix appended to the whole name, so a stem
    holding a dot keeps it (``fedmotion_s0.3`` -> ``fedmotion_s0.3.json``); a name ending in one
    of :data:`OUTPUT_SUFFIXES` has that replaced (``cost.json`` -> ``cost.md``)."""
    stem = out.name[: -len(out.suffix)] if out.suffix in OUTPUT_SUFFIXES else out.name
    return out.with_name(stem + suffix)


# ----------------------------------------------------------------------------- plots


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> None:
    """Lay ``fig`` out, write it to ``path`` (PNG at 110 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def errorbar(ax: Axes, xs: Sequence[float], summaries: Sequence[dict[str, Any]], **kwargs: Any) -> None:
    """Means of ``summaries`` (``mean``, ``ci_low``, ``ci_high`` each) at ``xs``, with their intervals."""
    means = np.array([s["mean"] for s in summaries])
    low = means - np.array([s["ci_low"] for s in summaries])
    high = np.array([s["ci_high"] for s in summaries]) - means
    ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=3, **kwargs)


def _legend(axes: np.ndarray) -> None:
    """A legend on the panel that has the most labelled lines (the last such one on a tie)."""
    panels = [a for row in np.atleast_2d(axes) for a in row]
    counts = [len(a.get_legend_handles_labels()[0]) for a in panels]
    if max(counts, default=0):
        best = max(range(len(panels)), key=lambda i: (counts[i], i))
        panels[best].legend(fontsize=7)


def _budget_axis(ax: Axes, budgets: Sequence[int]) -> None:
    """Log-2 N axis; a panel without any series says so (e.g. the probe runs federated only)."""
    if not ax.containers:
        ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets), [str(n) for n in budgets])
    ax.minorticks_off()
    ax.set_xlabel("labelled volumes per site (N)")
    ax.grid(alpha=0.3)


def _readout_panels(
    readouts: Sequence[str], ylabel: str
) -> tuple[Figure, np.ndarray, list[tuple[Axes, str, str]]]:
    """A figure with a titled panel per (readout, fine-tuning mode), a row per readout, one y scale.

    Returns:
        ``(figure, axes, panels)``: ``axes`` of shape ``(len(readouts), len(MODES))``; ``panels``
        lists ``(axes, readout, mode)`` row by row.
    """
    fig, axes = pyplot().subplots(
        len(readouts), len(MODES), figsize=(10, 3.8 * len(readouts)), sharey=True, squeeze=False
    )
    panels = []
    for row, readout in zip(axes, readouts):
        row[0].set_ylabel(ylabel)
        for ax, mode in zip(row, MODES):
            ax.set_title(f"{mode} fine-tuning, {READOUT_TITLES.get(readout, readout)}", fontsize=9)
            panels.append((ax, readout, mode))
    return fig, axes, panels


def plot_dice_vs_n(
    values: dict[tuple, dict[str, Any]],
    methods: Sequence[str],
    budgets: Sequence[int],
    readouts: Sequence[str],
    classes: Sequence[str],
    path: Path,
) -> None:
    """Mean Dice against N with 95% bootstrap intervals; a panel per (readout, mode)."""
    fig, axes, panels = _readout_panels(readouts, f"mean Dice ({', '.join(classes)})")
    for ax, readout, mode in panels:
        for method in methods:
            ns = [n for n in budgets if values.get((mode, readout, method, n), {}).get("n_pairs")]
            if ns:
                errorbar(ax, ns, [values[mode, readout, method, n] for n in ns], label=method)
        _budget_axis(ax, budgets)
    _legend(axes)
    save_figure(fig, path)


def plot_differences(
    differences: dict[tuple, dict[str, Any]],
    methods: Sequence[str],
    budgets: Sequence[int],
    readouts: Sequence[str],
    path: Path,
) -> None:
    """Method minus random init against N with 95% bootstrap intervals; the target as a dotted line."""
    fig, axes, panels = _readout_panels(readouts, "Dice minus random init")
    shown = [m for m in methods if m != RANDOM_INIT]
    for ax, readout, mode in panels:
        for i, method in enumerate(shown):
            ns = [n for n in budgets if differences.get((mode, readout, method, n), {}).get("n_pairs")]
            if ns:
                offset = 2 ** (0.06 * (i - (len(shown) - 1) / 2))  # spread the bars on the log axis
                xs = [n * offset for n in ns]
                errorbar(ax, xs, [differences[mode, readout, method, n] for n in ns], label=method)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axhline(TARGET["difference"], color="gray", linestyle=":", linewidth=0.8)
        _budget_axis(ax, budgets)
    _legend(axes)
    save_figure(fig, path)


def plot_learning_curves(
    test_curves: dict[tuple[str, str], dict[int, dict[str, Any]]],
    validation_curves: dict[tuple[str, str], dict[int, dict[str, Any]]],
    methods: Sequence[str],
    n_labeled: int,
    path: Path,
) -> None:
    """Dice against fine-tuning steps at ``n_labeled`` per method (test), and random init on validation."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 4), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        for method in methods:
            curve = test_curves.get((mode, method))
            if curve:
                errorbar(ax, list(curve), list(curve.values()), label=f"{method} (test)", markersize=3)
        curve = validation_curves.get((mode, RANDOM_INIT))
        if curve:
            means = [s["mean"] for s in curve.values()]
            ax.plot(list(curve), means, "k--", marker="s", markersize=3, label="random_init (validation)")
        ax.set_xlabel("fine-tuning optimiser steps")
        ax.set_title(f"{mode} fine-tuning, N={n_labeled}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean Dice")
    _legend(axes)
    save_figure(fig, path)


def plot_pretrain_curves(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Loss, alignment, uniformity and partition accuracy against round, per method."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, metric in zip(axes.flat, PRETRAIN_METRICS):
        for method, c in curves.items():
            if any(_finite(v) for v in c[metric]):
                ax.plot(c["rounds"], c[metric], marker="o", markersize=3, label=method)
        ax.set_xlabel("pre-training round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.grid(alpha=0.3)
    _legend(axes)
    save_figure(fig, path)


def plot_bytes(rows: list[Row], methods: Sequence[str], path: Path) -> None:
    """Pre-training bytes per site (up + down) by kind, per method."""
    plt = pyplot()
    shown = [m for m in methods if m != RANDOM_INIT and any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bottom = np.zeros(len(shown))
    for kind in byte_kinds(rows):
        values = np.array(
            [
                np.mean(
                    [
                        r["bytes_by_kind"].get(f"{kind}_up", 0) + r["bytes_by_kind"].get(f"{kind}_down", 0)
                        for r in rows
                        if r["method"] == m
                    ]
                )
                / 1e6
                for m in shown
            ]
        )
        ax.bar(shown, values, bottom=bottom, label=kind)
        bottom += values
    ax.set_ylabel("MB per site, all pre-training rounds")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    save_figure(fig, path)


def plot_examples(examples_dirs: Sequence[Path], methods: Sequence[str], classes: int, path: Path) -> bool:
    """Image, ground truth and prediction of one test slice per method (federated); False if none saved.

    Each method's ``<method>_federated.npz`` comes from the first folder of ``examples_dirs`` that
    has it; ``classes`` is the number of foreground classes (colour scale).
    """
    found = []
    for method in methods:
        file = next(
            (
                d / f"{method}_federated.npz"
                for d in examples_dirs
                if (d / f"{method}_federated.npz").exists()
            ),
            None,
        )
        if file:
            found.append((method, file))
    if not found:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(len(found), 3, figsize=(7, 2.3 * len(found)), squeeze=False)
    for row, (method, file) in zip(axes, found):
        data = np.load(file)
        z = int(np.argmax((data["label"] > 0).sum(axis=(0, 1))))
        image = data["image"][..., z].T
        for ax, (title, overlay) in zip(
            row, (("image", None), ("ground truth", "label"), ("prediction", "prediction"))
        ):
            ax.imshow(image, cmap="gray", origin="lower")
            if overlay:
                mask = np.ma.masked_equal(data[overlay][..., z].T, 0)
                ax.imshow(
                    mask,
                    cmap="viridis",
                    vmin=0,
                    vmax=classes,
                    alpha=0.6,
                    origin="lower",
                    interpolation="nearest",
                )
            ax.set_title(f"{method}: {title}" if title == "image" else title, fontsize=8)
            ax.axis("off")
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- the report


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` and tuple keys joined by ``/`` (strict JSON)."""
    if isinstance(value, dict):
        return {"/".join(map(str, k)) if isinstance(k, tuple) else k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(
    rows: list[Row],
    config: BenchConfig | Any,
    run_dir: Path | Sequence[Path],
    out_dir: Path,
    n_boot: int = 10_000,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``results.json``, ``report.md`` and the plots of the label-efficiency comparison.

    Args:
        rows: result rows (see the module docstring); rows of the old protocol (no ``readout``,
            ``finetune_steps``, ``eval_split``) count as full fine-tuning scored on test.
        config: the run's ``BenchConfig`` (``methods``, ``budgets``, ``seeds`` are read if present).
        run_dir: the run folder, or the folders of a merged run (see :func:`merge_runs`): the
            first gives the dataset description and environment; pre-training records and
            example slices come from the first folder that has them.
        out_dir: where the files go (created).
        n_boot: bootstrap resamples per interval.
        provenance: :func:`merge_runs`'s third value, shown in the report when given.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: there are no rows (names the run folder).
    """
    run_dirs = _run_dirs(run_dir)
    if not rows:
        raise ValueError(f"no rows to report from {', '.join(map(str, run_dirs))} (has any unit finished?)")
    missing = missing_units(rows, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = normalise_rows(rows, config)
    settings = config_dict(config)
    present = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in settings.get("methods", present) if m in present] + [
        m for m in present if m not in settings.get("methods", present)
    ]
    budgets = sorted(set(settings.get("budgets", [])) | {r["n_labeled"] for r in rows})
    readouts = [r for r in READOUTS if any(row["readout"] == r for row in rows)]
    readouts += sorted({row["readout"] for row in rows} - set(readouts))
    classes = class_names(rows)

    final = headline_rows(rows)
    steps = final_steps(rows)
    differences = difference_cells(final, methods, n_boot)
    comparisons = comparison_cells(final, methods, n_boot)
    values = value_cells(final, n_boot=n_boot)
    verdict = target_verdict(differences, settings.get("pretrain_overrides", {}).get("initial_encoder", ""))
    shares = ceiling_share(differences)
    plateau = plateau_rows(rows)
    n_curve = min(budgets) if budgets else 1
    test_curves = learning_curves(rows, n_curve, "test")
    validation_curves = learning_curves(rows, n_curve, "validation")
    records = load_pretrain_records(run_dirs, [m for m in methods if m != RANDOM_INIT])
    curves = pretrain_curves(records)
    full = [r for r in final if r["readout"] == "finetune"]
    cross = cross_site_rows(rows)
    cross_differences = difference_cells(cross, methods, n_boot)
    cross_values = value_cells(cross, n_boot=n_boot)

    kept = document_rows(rows, n_curve)
    document = result_document(kept, config, run_dirs)
    document["summary"] = _json_safe(
        {
            "final_steps": steps,
            "paired_differences": cell_records(differences),
            "dice": cell_records(values),
            "comparisons": [
                {"method": k[0], "baseline": k[1], "finetune": k[2], "readout": k[3], "n_labeled": k[4], **v}
                for k, v in sorted(comparisons.items(), key=repr)
            ],
            "cross_site": {
                "paired_differences": cell_records(cross_differences),
                "dice": cell_records(cross_values),
            },
            "target": verdict,
            "ceiling_share": shares,
            "random_init_plateau": plateau,
            "pretraining": curves,
            "provenance": provenance or {},
            "missing_units": missing,
            "n_boot": n_boot,
        }
    )
    (out_dir / "results.json").write_text(dump_document(document))

    plot_dice_vs_n(values, methods, budgets, readouts, classes, out_dir / "dice_vs_n.png")
    plot_differences(differences, methods, budgets, readouts, out_dir / "paired_differences.png")
    plot_learning_curves(test_curves, validation_curves, methods, n_curve, out_dir / "dice_vs_steps.png")
    plots = [
        ("Dice against N, 95% bootstrap intervals", "dice_vs_n.png"),
        ("Paired differences against random init, 95% bootstrap intervals", "paired_differences.png"),
        (f"Dice against fine-tuning steps at N={n_curve}", "dice_vs_steps.png"),
    ]
    if any(_finite(v) for c in curves.values() for m in PRETRAIN_METRICS for v in c[m]):
        plot_pretrain_curves(curves, out_dir / "pretrain_curves.png")
        plots.append(("Pre-training curves", "pretrain_curves.png"))
    if any(r["method"] != RANDOM_INIT for r in full):
        plot_bytes(full, methods, out_dir / "bytes.png")
        plots.append(("Pre-training bytes per method", "bytes.png"))
    if plot_examples([d / "examples" for d in run_dirs], methods, len(classes), out_dir / "examples.png"):
        plots.append(("Example test slices, federated fine-tuning", "examples.png"))

    seeds = sorted({r["seed"] for r in rows})
    sites = sorted({r["site"] for r in rows})
    shown_settings = {k: v for k, v in settings.items() if k not in ("methods", "budgets", "seeds")}
    parts = [
        "# Label efficiency of the pre-training methods (SPEC §7 protocol)\n",
        verdict_line(verdict) + "\n",
        *([ceiling_paragraph(shares) + "\n"] if shares else []),
        f"{len(sites)} sites, seeds {seeds}, N = {', '.join(map(str, budgets))} labelled volumes per site, "
        f"methods {', '.join(methods)}. Dice is the mean over {', '.join(classes)} on each site's held-out "
        "test patients, scored at the last checkpoint of the fine-tuning budget.\n",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in document["environment"].items()) + ".\n",
        f"{len(rows)} rows ({len(kept)} in `results.json`: the final checkpoint on test, every checkpoint "
        f"at N={n_curve} on test and random init's validation rows); "
        + (
            f"**{len(missing)} units missing** (the run stopped before them; by N: "
            + ", ".join(f"N={n}: {count}" for n, count in sorted(missing_by_budget(missing).items()))
            + (f"; the first {SHOWN_MISSING}" if len(missing) > SHOWN_MISSING else "")
            + f": {', '.join(missing[:SHOWN_MISSING])}; all in `results.json`).\n"
            if missing
            else "every unit of the grid completed.\n"
        ),
    ]
    if provenance and (len(run_dirs) > 1 or provenance.get("duplicates")):
        parts.append(
            "Merged run folders: "
            + "; ".join(f"{m} from `{src}`" for m, src in provenance["sources"].items())
            + ".\n"
        )
        for method, dup in provenance.get("duplicates", {}).items():
            gap = dup["max_abs_dice_difference"]
            parts.append(
                f"{method} also ran in {', '.join(f'`{f}`' for f in dup['folders'])} (not used); its Dice "
                + (
                    f"differs there by at most {gap:.4f}.\n"
                    if gap is not None
                    else "has no matching rows there.\n"
                )
            )
    parts += [
        "\n## Headline: method minus random init\n",
        "Paired on seed, site, split and decoder initialisation; mean difference in mean Dice with a "
        f"95% percentile bootstrap interval over the (seed, site) pairs ({n_boot} resamples, fixed seed). "
        "The sites of one seed share its pre-trained encoder, so the verdict line also gives the interval "
        "when whole seeds are resampled (`seed_ci_low`/`seed_ci_high` in `results.json`).\n",
    ]
    for mode, readout in scored_cells(values, readouts):
        parts += [
            f"\n### {mode.capitalize()} fine-tuning, {READOUT_TITLES.get(readout, readout)}\n",
            grid_table(
                differences,
                (mode, readout),
                methods,
                budgets,
                with_seed_count(format_difference, len(seeds)),
            ),
            "\nStd across seeds of the per-seed site-averaged difference:\n",
            grid_table(
                differences,
                (mode, readout),
                methods,
                budgets,
                lambda s: "—" if not s or not _finite(s["std_seeds"]) else f"{s['std_seeds']:.3f}",
            ),
        ]
    if comparisons:
        parts += ["\n## Method against method\n", *comparison_section(comparisons, budgets)]
    parts += ["\n## Fine-tuning budget and random init's plateau\n", *plateau_section(plateau, steps)]
    value_cell = with_seed_count(format_value, len(seeds))
    parts.append("\n## Mean Dice, mean ± std across seeds of the per-seed site mean\n")
    for mode, readout in scored_cells(values, readouts):
        parts += [
            f"\n### {mode.capitalize()} fine-tuning, {READOUT_TITLES.get(readout, readout)}\n",
            grid_table(values, (mode, readout), methods, budgets, value_cell),
        ]
    for mode in MODES:
        for cls in classes:
            parts += [
                f"\n### {mode.capitalize()} fine-tuning: {cls} Dice\n",
                grid_table(
                    value_cells(full, lambda r, c=cls: (r.get("dice") or {}).get(c), 1),
                    (mode, "finetune"),
                    methods,
                    budgets,
                    value_cell,
                ),
            ]
        parts += [
            f"\n### {mode.capitalize()} fine-tuning: HD95 (mm)\n",
            grid_table(
                value_cells(full, lambda r: r.get("hd95_mean"), 1),
                (mode, "finetune"),
                methods,
                budgets,
                value_cell,
            ),
        ]
    if cross_values:
        parts.append("\n## Cross-site generalisation, local fine-tuning (SPEC §7)\n")
        parts += cross_site_section(cross_differences, cross_values, methods, budgets, len(seeds))
    parts.append(f"\n## Dice against fine-tuning steps, N={n_curve} (test split, full fine-tuning)\n")
    for mode in MODES:
        shown = [m for m in methods if (mode, m) in test_curves]
        all_steps = sorted({s for m in shown for s in test_curves[mode, m]})
        if not shown:
            continue
        parts += [
            f"\n### {mode.capitalize()} fine-tuning\n",
            "| method | " + " | ".join(f"{s} steps" for s in all_steps) + " |",
            "|---|" + "---|" * len(all_steps),
            *(
                f"| {m} | " + " | ".join(value_cell(test_curves[mode, m].get(s)) for s in all_steps) + " |"
                for m in shown
            ),
        ]
    parts += ["\n## Pre-training curves\n"]
    parts.append(
        curves_table(curves)
        + "\n\nMean over sites and seeds per round; alignment and uniformity as in Wang & Isola (lower is "
        "better), partition accuracy: nearest-mean classification of the partition index; — where a "
        "round did not measure it (a decoder column's last rounds are its decoder stage, which records "
        "only its loss)."
        if curves
        else "No pre-training record holds a curve."
    )
    parts += [
        "\n## Against the published ordering (SPEC §1)\n",
        *(
            [f"- {s}" for s in ordering_sentences(full, budgets, methods)]
            or ["No column holds every method the published table has for it."]
        ),
    ]
    parts += ["\n## Bytes, time and memory per site\n", bytes_table(full, methods)]
    from fedcontrast.bench.protocol import SETTING_CHOICES

    parts += [
        "\n## Settings of the run, and how each was chosen\n",
        "No setting was chosen by looking at test scores (SPEC §7).\n",
        "| setting | value | how it was chosen |",
        "|---|---|---|",
        *(
            f"| `{k}` | `{json.dumps(v)}` | {SETTING_CHOICES.get(k, 'the profile default')} |"
            for k, v in shown_settings.items()
        ),
    ]
    parts += ["\n## Plots\n", *(f"![{title}]({file})\n" for title, file in plots)]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report


def write_subset(
    rows: list[dict[str, Any]],
    config: BenchConfig | Any,
    run_dir: Path | Sequence[Path],
    path: Path,
    methods: Sequence[str],
    budgets: Sequence[int],
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A results-format file holding only ``methods`` x ``budgets`` of a run at its final test
    checkpoint; returns those rows."""
    final = headline_rows(normalise_rows(rows, config))
    subset = [r for r in final if r["method"] in methods and r["n_labeled"] in budgets]
    document = result_document(subset, config, run_dir)
    document["config"]["methods"], document["config"]["budgets"] = list(methods), list(budgets)
    document.update(extra or {})
    path.write_text(dump_document(document))
    return subset


def write_fcl_vs_baselines(
    rows: list[dict[str, Any]], config: BenchConfig | Any, run_dir: Path | Sequence[Path], out_dir: Path
) -> Path:
    """Issue 4's comparison: FCL, random init, local CL and FedSimCLR at N = 1 and 2."""
    methods, budgets = ["random_init", "local_cl", "fedsimclr", "fcl"], [1, 2]
    subset = write_subset(rows, config, run_dir, out_dir / "fcl_vs_baselines.json", methods, budgets)
    seeds = sorted({r["seed"] for r in subset})
    parts = [
        "# FCL against its baselines\n",
        f"{len({r['site'] for r in subset})} sites, seeds {seeds}, rows from the comparison run. Mean Dice "
        "at the last fine-tuning checkpoint on test, mean ± std across seeds of the per-seed site mean.\n",
    ]
    for mode in MODES:
        parts += [
            f"\n## {mode.capitalize()} fine-tuning\n",
            table(subset, mode, methods, budgets, lambda r: r["dice_mean"]),
        ]
    parts += [
        "\n## Ordering against the published table\n",
        *(f"- {s}" for s in ordering_sentences(subset, budgets, methods)),
    ]
    report = out_dir / "fcl_vs_baselines.md"
    report.write_text("\n".join(parts) + "\n")
    return report


COMMUNICATION_METHODS = ["fcl", "fedbyol", "fclopt", "fclopt_ptnu", "fclopt_ptnu_dp"]
#: What ``target_gap`` compares the sites' predicted target with, by method (see ``TargetSync``).
GAP_REFERENCE = {
    "fclopt_ptnu": "the average of the sites' real targets (every site uploads its target)",
    "fclopt_ptnu_dp": "the server's running target (real targets where sites uploaded, "
    "predictions elsewhere)",
}


def bytes_per_round(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """method -> ``{kind_direction: bytes}``, the mean over sites, rounds and seeds of one site's round."""
    per_round: dict[str, dict[str, float]] = {}
    for method, recs in records.items():
        values: dict[str, list[float]] = defaultdict(list)
        for r in (r for rec in recs for r in rec["per_round"]):
            for direction in ("up", "down"):
                for kind, value in r[f"bytes_{direction}"].items():
                    values[f"{kind}_{direction}"].append(value)
        if values:
            per_round[method] = {k: float(np.mean(v)) for k, v in sorted(values.items())}
    return per_round


def target_sync_summary(records: dict[str, list[dict[str, Any]]], sites: int) -> dict[str, dict[str, float]]:
    """method -> mean ``target_gap``, share of site-rounds that uploaded a target, corrections sent."""
    summary = {}
    for method, recs in records.items():
        logs = [s for rec in recs for s in rec["server_metrics"] if "target_gap" in s]
        if logs:
            summary[method] = {
                "target_gap": float(np.mean([s["target_gap"] for s in logs])),
                "upload_share": float(np.mean([s["target_uploads"] for s in logs]) / sites),
                "corrections": float(np.sum([s["target_correction"] for s in logs])),
                "rounds": len(logs),
            }
    return summary


def savings_sentences(total: dict[str, float], floor: float) -> list[str]:
    """The saving of each mechanism as ratios of bytes per site and round."""
    sentences = [
        f"{m}: {total[m] / total['fedbyol']:.2f}x the bytes of federated BYOL and "
        f"{total[m] / total['fcl']:.2f}x those of FCL."
        for m in total
        if "fedbyol" in total and "fcl" in total
    ]
    steps = [
        ("fclopt", "fedbyol", "Dropping negatives while keeping both networks in sync"),
        ("fclopt_ptnu", "fclopt", "PTNU (no target download)"),
        ("fclopt_ptnu_dp", "fclopt_ptnu", "DP (target uploads only when needed)"),
    ]
    sentences += [
        f"{what}: {new} sends {total[new] / total[old]:.2f}x the bytes of {old}."
        for new, old, what in steps
        if new in total and old in total
    ]
    if floor:
        sentences.append(
            f"Floor (FedAvg of FCLOpt's online network alone: encoder, projection head and predictor, up "
            f"and down): {floor / 1e3:.1f} KB; "
            + ", ".join(f"{m} is {total[m] / floor:.2f}x it" for m in total)
            + ". FCL's network has no predictor, so its weights alone are smaller than this floor."
        )
    return sentences


def write_communication(
    rows: list[dict[str, Any]], config: BenchConfig | Any, run_dir: Path | Sequence[Path], out_dir: Path
) -> Path:
    """Issue 5's communication comparison: bytes per site per round by kind, savings, floor, Dice."""
    methods, budgets = COMMUNICATION_METHODS, [1, 2]
    records = load_pretrain_records(_run_dirs(run_dir), methods)
    per_round = bytes_per_round(records)
    total = {m: sum(v.values()) for m, v in per_round.items()}
    fclopt = per_round.get("fclopt", {})
    floor = fclopt.get("weights_up", 0.0) + fclopt.get("weights_down", 0.0)
    sites = len({r["site"] for r in rows})
    sync = target_sync_summary(records, sites)
    extra = {
        "bytes_per_site_per_round": per_round,
        "total_bytes_per_site_per_round": total,
        "floor_bytes_per_site_per_round": floor,
        "target_sync": sync,
    }
    subset = write_subset(rows, config, run_dir, out_dir / "communication.json", methods, budgets, extra)
    kinds = sorted({k for v in per_round.values() for k in v})
    lines = [
        "| method | " + " | ".join(f"{k} (KB)" for k in kinds) + " | total (KB) |",
        "|---|" + "---|" * (len(kinds) + 1),
        *(
            "| "
            + " | ".join(
                [m, *(f"{per_round[m].get(k, 0) / 1e3:.1f}" for k in kinds), f"{total[m] / 1e3:.1f}"]
            )
            + " |"
            for m in methods
            if m in per_round
        ),
    ]
    parts = [
        "# Communication of the federated pre-training methods\n",
        f"Payload bytes (`ndarray.nbytes`, counted by `count_bytes` on the messages the protocol sends) per "
        f"site and round, mean over {sites} sites, every pre-training round and "
        f"{len({r['seed'] for r in rows})} seeds; same data and rounds for every method.\n",
        "\n".join(lines),
        "\n## Savings (bytes per site and round)\n",
        *(f"- {s}" for s in savings_sentences(total, floor)),
        "\n## Target synchronisation (PTNU, DP)\n",
        *(
            f"- {m}: the sites' predicted target lies {v['target_gap']:.2e} (relative L2, mean over "
            f"{v['rounds']} rounds x seeds) from {GAP_REFERENCE.get(m, 'the server target')}; "
            f"{100 * v['upload_share']:.0f}% of site-rounds uploaded a target; "
            f"{v['corrections']:.0f} correction(s) sent."
            for m, v in sync.items()
        ),
    ]
    for mode in MODES:
        parts += [
            f"\n## Dice reached, {mode} fine-tuning\n",
            table(subset, mode, methods, budgets, lambda r: r["dice_mean"]),
        ]
    report = out_dir / "communication.md"
    report.write_text("\n".join(parts) + "\n")
    return report
