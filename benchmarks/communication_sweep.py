"""Bytes below the floor: the federated pre-training methods at full and reduced transfer
precision, DP's δ/T sweep, PTNU's optional target upload, prototypes against features.

Every run pre-trains in process (``fedcontrast.bench.protocol.pretrain_unit``: the methods'
real protocol, the project's byte counter on the messages as they travel; with ``transfer``
float16/blockwise8 the networks are counted as encoded and every receiver gets the decoded
values, as through the quantisation filter pair of a job). Settings marked for Dice are then
fine-tuned and scored under the label-efficiency protocol as it is on main
(``fedcontrast.bench.protocol.finetune_unit``, local mode, N = the smallest budget, the
``BenchConfig`` defaults for steps, checkpoints, batch, learning rate and the held-out test
and validation patients); the score is the last checkpoint's Dice on each site's test
patients.

Reported per setting: payload bytes per site and round by kind and direction, the ratio to
federated BYOL and to the floor (FedAvg of FCLOpt's online network alone, up and down, at full
precision), DP's uploads (fraction of site-rounds), corrections per run, the prediction gap
(``target_gap``: mean over the rounds with uploads, and in the last round), the fine-tuned
Dice (mean and 95% bootstrap interval over the (seed, site) scores) and its **paired
difference** from the setting's reference (the full-precision DP run; for the δ sweep and
prototypes, the default DP run): same seed, same site, same split,
the interval a percentile bootstrap over the (seed, site) pairs
(:mod:`fedcontrast.bench.stats`).

Methods whose message sizes do not depend on the training (every method but
``fclopt_ptnu_dp``, whose uploads follow the sites' drift) are measured bytes-only with one
local step a round: their bytes per round are those of any step count. DP's bytes-only settings
train the full pre-training.

Every finished (setting, seed) is appended to ``<out>/runs.jsonl`` with the pre-training and
fine-tuning settings it ran under; a later call with the same ``--out`` skips what is done under
the same settings, re-runs pre-training whose settings changed, and re-measures only the Dice of
a run whose fine-tuning settings changed (or that was bytes-only). The report is rewritten after
every run, and a run that would not finish inside ``--budget-min`` is not started (the report
lists it).

    python benchmarks/communication_sweep.py --out workspace/comm-sweep \
        --report benchmarks/results/communication
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedcontrast.bench import stats
from fedcontrast.bench.environment import environment
from fedcontrast.bench.protocol import BenchConfig, FinetuneUnit, finetune_unit, prepare_splits, pretrain_unit
from fedcontrast.bench.report import output_file
from fedcontrast.methods.base import select
from fedcontrast.methods.registry import get_method

logger = logging.getLogger("communication_sweep")


@dataclass
class Setting:
    """One row of the report: a method with config overrides.

    ``dice``: fine-tune and score its runs; ``reference``: the setting whose Dice it is paired with.
    """

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    dice: bool = False
    reference: str | None = None


#: The reference of the comparisons: FCLOpt+PTNU+DP at its defaults (float32, δ = 1e-3, T = 5, features).
REFERENCE = "fclopt_ptnu_dp"

#: The δ the sweep's reference DP run and its variants use: the method's default when the sweep
#: was measured (the default is now 1e-2, chosen on this sweep), pinned so the labels stay true.
DELTA_1E3: dict[str, Any] = {"delta": 1e-3}
#: The method of the reference and of every DP variant.
DP = "fclopt_ptnu_dp"
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("fcl", "fcl"),
        Setting("fedbyol", "fedbyol"),
        Setting("fclopt", "fclopt"),
        Setting("fclopt_ptnu", "fclopt_ptnu"),
        Setting("fclopt_ptnu+upload", "fclopt_ptnu", {"ptnu_upload": True}),
        Setting(REFERENCE, DP, DELTA_1E3, dice=True),
        Setting("fclopt_ptnu_dp fp16", DP, {**DELTA_1E3, "transfer": "float16"}, True, REFERENCE),
        Setting("fclopt_ptnu_dp 8bit", DP, {**DELTA_1E3, "transfer": "blockwise8"}, True, REFERENCE),
        Setting("dp prototypes", DP, {**DELTA_1E3, "exchange": "prototypes"}, True, REFERENCE),
        Setting("dp δ=0", DP, {"delta": 0.0}, True, REFERENCE),
        Setting("dp δ=3e-5", DP, {"delta": 3e-5}, False, REFERENCE),
        Setting("dp δ=1e-4", DP, {"delta": 1e-4}, False, REFERENCE),
        Setting("dp δ=3e-4", DP, {"delta": 3e-4}, False, REFERENCE),
        Setting("dp δ=3e-3", DP, {"delta": 3e-3}, False, REFERENCE),
        Setting("dp δ=1e-2", DP, {"delta": 1e-2}, True, REFERENCE),
        Setting("dp δ=1e-2 fp16", DP, {"delta": 1e-2, "transfer": "float16"}, False, REFERENCE),
        Setting("dp δ=1e-3 T=1000", DP, {**DELTA_1E3, "sync_every": 1000}, False, REFERENCE),
        Setting("fcl fp16", "fcl", {"transfer": "float16"}),
        Setting("fedbyol fp16", "fedbyol", {"transfer": "float16"}),
        Setting("fclopt fp16", "fclopt", {"transfer": "float16"}),
        Setting("fclopt_ptnu fp16", "fclopt_ptnu", {"transfer": "float16"}),
    ]
}

_TRIPLET = (REFERENCE, "fclopt_ptnu_dp fp16", "fclopt_ptnu_dp 8bit")
#: (setting, index into the seeds) in order of priority: the report is rewritten after every run,
#: so a sweep stopped at its budget reports the most important comparisons complete.
SCHEDULE: list[tuple[str, int]] = [
    ("fedbyol", 0),  # every ratio needs it; one local step a round: cheap
    *((s, i) for i in (0, 1) for s in _TRIPLET),
    # above the sites' predicted distances (at 20 steps a round): what DP saves when it acts
    *(("dp δ=1e-2", i) for i in (0, 1)),
    ("dp δ=1e-2 fp16", 0),
    # bytes-only at one local step a round: cheap
    *((s, 0) for s in ("fcl", "fclopt", "fclopt_ptnu", "fcl fp16", "fedbyol fp16", "fclopt fp16")),
    *((s, 0) for s in ("fclopt_ptnu fp16", "fclopt_ptnu+upload")),
    ("dp δ=3e-3", 0),
    *(("dp prototypes", i) for i in (0, 1)),
    # a third seed for the Dice comparisons, the transfer precisions first
    *((s, 2) for s in (*_TRIPLET, "dp δ=1e-2", "dp prototypes")),
    *(("dp δ=0", i) for i in (0, 1)),
    *((s, 0) for s in ("dp δ=3e-5", "dp δ=1e-4", "dp δ=3e-4", "dp δ=1e-3 T=1000")),
    ("dp δ=0", 2),
    *((s, i) for i in (3, 4) for s in (*_TRIPLET, "dp δ=1e-2", "dp prototypes", "dp δ=0")),
]

#: Methods whose messages have the same size whatever the training does (measured bytes-only with
#: one local step a round). ``fclopt_ptnu_dp`` is not among them: its uploads follow the drift.
STEP_FREE_METHODS = ("fcl", "fedbyol", "fclopt", "fclopt_ptnu")

#: ``BenchConfig`` fields the data split depends on: a run folder refuses others.
DATA_FIELDS = (
    "sites",
    "patients_per_site",
    "test_per_site",
    "validation_per_site",
    "data_seed",
    "size",
    "difficulty",
)
#: Fields a pre-training depends on (besides the method and seed).
PRETRAIN_FIELDS = (
    *DATA_FIELDS,
    "pretrain_steps",
    "pretrain_rounds",
    "batch_size",
    "bundle",
    "pretrain_overrides",
)
#: Fields a fine-tuning depends on (besides its pre-training).
FINETUNE_FIELDS = (
    "budgets",
    "finetune_steps",
    "finetune_checkpoints",
    "finetune_lr",
    "finetune_batch_samples",
)


def fingerprint(config: BenchConfig, fields: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """The ``fields`` of ``config`` (plus ``extra``) as plain JSON values."""
    return json.loads(json.dumps({**{f: getattr(config, f) for f in fields}, **extra}, sort_keys=True))


def run_config(config: BenchConfig, setting: Setting) -> BenchConfig:
    """``config`` with the setting's overrides; one local step a round for step-free bytes-only settings."""
    cfg = replace(config, pretrain_overrides={**config.pretrain_overrides, **setting.overrides})
    if not setting.dice and setting.method in STEP_FREE_METHODS:
        cfg = replace(cfg, pretrain_steps=cfg.pretrain_rounds)
    return cfg


def final_scores(rows: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
    """The test-split rows of the last checkpoint (one per site)."""
    return [r for r in rows if r["eval_split"] == "test" and r["finetune_steps"] == config.finetune_steps]


def run_job(
    config: BenchConfig,
    setting: Setting,
    seed: int,
    splits: dict[int, dict[str, dict]],
    out: Path,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pre-train one (setting, seed) and, for a Dice setting, fine-tune and score it.

    ``previous`` is the stored entry of the same (setting, seed), if any: its pre-training is kept
    when its settings equal this run's, its Dice when its fine-tuning settings do too.

    Returns the entry written to ``runs.jsonl``: ``setting``, ``method``, ``seed``, ``pretrain``
    and ``finetune`` (the settings it ran under; ``finetune`` None when bytes-only), ``record``
    (:func:`pretrain_unit`'s), ``scores`` (last-checkpoint test rows of :func:`finetune_unit`,
    one per site, ``dice_mean`` among their keys; None when bytes-only), ``finetune_wall_s``.
    """
    cfg = run_config(config, setting)
    pretrain_key = fingerprint(cfg, PRETRAIN_FIELDS, method=setting.method, seed=seed)
    finetune_key = fingerprint(cfg, FINETUNE_FIELDS) if setting.dice else None
    digest = hashlib.sha1(json.dumps(pretrain_key, sort_keys=True).encode()).hexdigest()[:8]
    folder = out / "pretrain" / f"{setting.name.replace(' ', '_')}_s{seed}_{digest}"
    smallest = min(cfg.budgets)
    if previous and previous.get("pretrain") == pretrain_key and (folder / "record.json").exists():
        record = previous["record"]
    else:
        previous = None
        record = pretrain_unit(cfg, setting.method, seed, splits[smallest], folder)
    entry = {
        "setting": setting.name,
        "method": setting.method,
        "seed": seed,
        "pretrain": pretrain_key,
        "finetune": None,
        "record": record,
        "scores": None,
        "finetune_wall_s": None,
    }
    if finetune_key is None:
        return entry
    if previous and previous.get("finetune") == finetune_key and previous.get("scores"):
        return {**entry, **{k: previous[k] for k in ("finetune", "scores", "finetune_wall_s")}}
    unit = FinetuneUnit(setting.method, seed, "local", smallest)
    rows = finetune_unit(cfg, unit, splits[smallest], folder, record, out / "examples")
    scores = [{**r, "setting": setting.name} for r in final_scores(rows, cfg)]
    return {
        **entry,
        "finetune": finetune_key,
        "scores": scores,
        "finetune_wall_s": rows[0]["finetune_wall_s"],
    }


def load_runs(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(setting, seed) -> its latest entry in ``runs.jsonl`` ({} when there is none)."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                logger.warning(
                    "%s:%d: ignoring a line that is not JSON (a run killed while writing it)", path, number
                )
                continue
            runs[(entry["setting"], entry["seed"])] = entry
    return runs


def check_data(config: BenchConfig, out: Path) -> None:
    """Refuse a run folder whose phantom and splits were made with other data settings.

    Raises:
        ValueError: ``out`` holds data of other settings; the message names them.
    """
    saved, current = out / "sweep_data.json", fingerprint(config, DATA_FIELDS)
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise ValueError(
                f"{out} holds data of other settings ({', '.join(changed)}); choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(current, indent=1))


def is_valid(entry: dict[str, Any], config: BenchConfig, seeds: list[int]) -> bool:
    """True when a stored entry's pre-training (and, for a Dice setting, its fine-tuning) is this run's."""
    setting = SETTINGS.get(entry["setting"])
    if setting is None or entry["seed"] not in seeds:
        return False
    cfg = run_config(config, setting)
    if entry.get("pretrain") != fingerprint(cfg, PRETRAIN_FIELDS, method=setting.method, seed=entry["seed"]):
        return False
    return not setting.dice or entry.get("finetune") == fingerprint(cfg, FINETUNE_FIELDS)


def job_kind(setting: Setting) -> tuple[bool, bool]:
    """(fine-tuned, bytes-only at one local step a round): jobs of one kind take about as long."""
    return setting.dice, not setting.dice and setting.method in STEP_FREE_METHODS


def run_sweep(
    config: BenchConfig,
    out: Path,
    schedule: list[tuple[str, int]],
    budget_s: float = math.inf,
    on_run: Any = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """Run the ``schedule``'s (setting, seed index) jobs one after the other in this process.

    Jobs done under the same settings in ``out`` are kept; a job is not started when the wall
    time so far plus the longest finished job of its kind (:func:`job_kind`; finished in this call
    or, from their recorded walls, in an earlier one) would exceed ``budget_s``.
    ``on_run(valid_entries)`` is called after every job.

    Returns:
        The valid entries (in schedule order) and the (setting, seed) jobs not run.
    """
    start = time.perf_counter()
    check_data(config, out)
    splits = prepare_splits(config, out)
    path = out / "runs.jsonl"
    stored = load_runs(path)
    seeds = list(config.seeds)
    jobs = [(name, seeds[i]) for name, i in schedule if i < len(seeds)]
    unknown = sorted({name for name, _ in jobs} - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    longest: dict[tuple[bool, bool], float] = {}
    for entry in stored.values():
        if entry.get("setting") in SETTINGS:
            kind = job_kind(SETTINGS[entry["setting"]])
            wall = entry["record"]["wall_s"] + (entry.get("finetune_wall_s") or 0.0)
            longest[kind] = max(longest.get(kind, 0.0), wall)
    skipped = []

    def valid() -> list[dict[str, Any]]:
        return [stored[j] for j in jobs if j in stored and is_valid(stored[j], config, seeds)]

    for name, seed in jobs:
        setting = SETTINGS[name]
        if (name, seed) in stored and is_valid(stored[(name, seed)], config, seeds):
            continue
        elapsed = time.perf_counter() - start
        if elapsed + longest.get(job_kind(setting), 0.0) > budget_s:
            skipped.append((name, seed))
            logger.info("not started (budget): %s seed %d", name, seed)
            continue
        began = time.perf_counter()
        entry = run_job(config, setting, seed, splits, out, stored.get((name, seed)))
        kind = job_kind(setting)
        longest[kind] = max(longest.get(kind, 0.0), time.perf_counter() - began)
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        stored[(name, seed)] = entry
        logger.info("done: %s seed %d in %.0f s", name, seed, time.perf_counter() - began)
        if on_run is not None:
            on_run(valid())
    return valid(), skipped


def per_site_round(record: dict[str, Any], rounds: int) -> dict[str, float]:
    """Bytes per site and round by ``<kind>_<direction>`` and in ``total`` (mean over sites)."""
    sites = record["sites"].values()
    keys = next(iter(sites))["bytes_by_kind"]
    mean = {k: statistics.fmean(s["bytes_by_kind"][k] for s in sites) / rounds for k in keys}
    mean["total"] = (
        statistics.fmean(s["pretrain_bytes_up"] + s["pretrain_bytes_down"] for s in sites) / rounds
    )
    return mean


def floor_bytes(config: BenchConfig) -> float:
    """FedAvg of FCLOpt's online network alone (encoder, head, predictor), up and down, float32."""
    initial = get_method("fclopt").trainer.initial_message(config.pretrain_config(0))
    return 2.0 * sum(v.nbytes for v in select(initial, "weights").values())


def _interval(summary: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "mean",
        "ci_low",
        "ci_high",
        "seed_ci_low",
        "seed_ci_high",
        "std_seeds",
        "n_pairs",
        "n_seeds",
        "n_sites",
    )
    return {k: summary[k] for k in keep}


def summarise(entries: list[dict[str, Any]], config: BenchConfig) -> dict[str, Any]:
    """One row per setting with runs: bytes, ratios, DP bookkeeping, Dice and its paired difference.

    Raises:
        ValueError: there is no ``fedbyol`` run (every ratio is to its bytes).
    """
    rounds = config.pretrain_rounds
    floor = floor_bytes(config)
    scores = [{**s, "method": s["setting"]} for e in entries if e["scores"] for s in e["scores"]]
    rows: dict[str, dict[str, Any]] = {}
    for name, setting in SETTINGS.items():
        runs = [e for e in entries if e["setting"] == name]
        if not runs:
            continue
        by_run = [per_site_round(e["record"], rounds) for e in runs]
        mean = {k: statistics.fmean(b[k] for b in by_run) for k in by_run[0]}
        sync = [m for e in runs for m in e["record"]["server_metrics"] if "target_uploads" in m]
        sites = len(runs[0]["record"]["sites"])
        # the gap measures the sites' real targets only in rounds where some site uploaded its target
        # (otherwise the server's running target is its own prediction folded in): those rounds only
        measured = [
            m for m in sync if m["target_uploads"] > 0 and math.isfinite(m.get("target_gap", math.nan))
        ]
        gaps = [m["target_gap"] for m in measured]
        last_round = max((m["round"] for m in sync), default=None)
        last = [
            m["target_gap"] for m in measured if m["round"] == last_round and m["target_uploads"] == sites
        ]
        row: dict[str, Any] = {
            "method": setting.method,
            "overrides": setting.overrides,
            "seeds": [e["seed"] for e in runs],
            "local_steps_per_round": runs[0]["pretrain"]["pretrain_steps"] // rounds,
            "bytes_per_site_round": mean,
            "floor_ratio": mean["total"] / floor,
            "uploads": sum(m["target_uploads"] for m in sync) / (len(sync) * sites) if sync else None,
            "corrections_per_run": sum(m["target_correction"] for m in sync) / len(runs) if sync else None,
            "target_gap": statistics.fmean(gaps) if gaps else None,
            "last_round_gap": statistics.fmean(last) if last else None,
            "pretrain_wall_s": statistics.fmean(e["record"]["wall_s"] for e in runs),
        }
        own = [s for s in scores if s["method"] == name]
        if own:
            row["dice"] = _interval(stats.values_summary(own))
            row["dice_values"] = {f"{s['seed']}/{s['site']}": s["dice_mean"] for s in own}
        if setting.reference and own:
            pairs = stats.paired_differences(scores, name, setting.reference)
            if pairs:
                row["reference"] = setting.reference
                row["dice_paired"] = _interval(stats.summarise(pairs))
        rows[name] = row
    if "fedbyol" not in rows:
        raise ValueError("the ratios need federated BYOL's bytes: no fedbyol run among the entries")
    fedbyol = rows["fedbyol"]["bytes_per_site_round"]["total"]
    for row in rows.values():
        row["fedbyol_ratio"] = row["bytes_per_site_round"]["total"] / fedbyol
    # first seed's per-(round, site) pre-training losses, to tell settings that train identically
    curves = {
        name: [c.get("loss") for c in runs[0]["record"]["curve"]]
        for name in rows
        if (runs := [e for e in entries if e["setting"] == name])
    }
    return {"floor_bytes_per_site_round": floor, "settings": rows, "curves": curves}


def kb(value: float | None) -> str:
    """Bytes as KB (1024) with one decimal; "" for None."""
    return "" if value is None else f"{value / 1024:.1f}"


def _ci(summary: dict[str, Any], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    return f"{summary['mean']:{fmt}} [{summary['ci_low']:{fmt}}, {summary['ci_high']:{fmt}}]"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Plain statements of what met issue 16's targets and what missed, with the numbers."""
    rows = summary["settings"]
    out = []
    dp, dp16, dp8 = rows.get(REFERENCE), rows.get("fclopt_ptnu_dp fp16"), rows.get("fclopt_ptnu_dp 8bit")
    if dp:
        weights_only = (
            summary["floor_bytes_per_site_round"] / rows["fedbyol"]["bytes_per_site_round"]["total"]
        )
        out.append(
            f"- FCLOpt+PTNU+DP at full precision: {dp['fedbyol_ratio']:.3f}x federated BYOL's bytes (target "
            f"<= 0.55x): {'met' if dp['fedbyol_ratio'] <= 0.55 else 'MISSED'}. The floor alone (its online "
            f"weights up and down at float32) is {weights_only:.3f}x federated BYOL's bytes."
        )
    else:
        out.append("- FCLOpt+PTNU+DP at full precision: not run.")
    for name in ("fclopt_ptnu_dp fp16", "dp δ=1e-2 fp16"):
        if row := rows.get(name):
            delta = row["overrides"].get("delta", 1e-3)
            out.append(
                f"- FCLOpt+PTNU+DP with float16 transfer at δ = {delta:g}: {row['floor_ratio']:.3f}x the "
                f"floor (target <= 0.6x): {'met' if row['floor_ratio'] <= 0.6 else 'MISSED'}."
            )
    for row, label in ((dp16, "float16"), (dp8, "8-bit blockwise")):
        if dp and row and "dice" in dp and "dice" in row:
            ref, own = dp["dice"], row["dice"]
            inside = ref["ci_low"] <= own["mean"] <= ref["ci_high"]
            paired = row.get("dice_paired")
            text = (
                f"- Fine-tuned Dice with {label} transfer: {own['mean']:.3f} against {_ci(ref)} at full "
                f"precision: {'met (inside the interval)' if inside else 'MISSED (outside the interval)'}"
            )
            if paired:
                zero = paired["ci_low"] <= 0.0 <= paired["ci_high"]
                text += (
                    f"; paired difference {_ci(paired, True)} over {paired['n_pairs']} (seed, site) pairs "
                    f"({paired['n_seeds']} seeds), {'containing' if zero else 'EXCLUDING'} 0"
                )
                if paired["n_seeds"] < 2:
                    text += (
                        ". With one seed both intervals only span the sites' spread (no seed variance): "
                        "this comparison cannot separate anything"
                    )
            out.append(text + ".")
    ptnu, upload = rows.get("fclopt_ptnu"), rows.get("fclopt_ptnu+upload")
    if ptnu and upload:
        out.append(
            f"- PTNU's every-round target upload (`ptnu_upload`, off by default): "
            f"{kb(upload['bytes_per_site_round']['total'])} KB per site and round with it, "
            f"{kb(ptnu['bytes_per_site_round']['total'])} KB without ({upload['floor_ratio']:.3f}x and "
            f"{ptnu['floor_ratio']:.3f}x the floor); pre-training losses "
            f"{'identical' if same_training(summary, 'fclopt_ptnu', 'fclopt_ptnu+upload') else 'DIFFERENT'} "
            "with and without it (seed 0)."
        )
    return out


def same_training(summary: dict[str, Any], a: str, b: str) -> bool:
    """True when settings ``a`` and ``b`` have bit-identical pre-training losses on their first seed."""
    curves = summary["curves"]
    return a in curves and b in curves and curves[a] == curves[b]


def render(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown report."""
    rows = summary["settings"]
    kinds = ["weights_down", "weights_up", "target_down", "target_up", "features_down", "features_up"]
    config = meta["bench_config"]
    lines = [
        "# Communication of the federated pre-training methods: precision, DP's δ/T, PTNU's upload",
        "",
        f"Written by `{meta['command']}` on {meta['environment']['date']} "
        f"({meta['environment']['cpu']}, CPU only, torch {meta['environment'].get('torch')}, checkout at "
        f"{meta['main_commit']}), {meta['wall_min']:.1f} min wall (this call; 1-min load average "
        f"{meta['load_average_start']:.1f} at its start, {meta['load_average_end']:.1f} at the last "
        "report: the machine was shared).",
        "",
        f"Setup: {config['sites']} phantom sites x {config['patients_per_site']} patients "
        f"({config['difficulty']} phantom; per site {config['test_per_site']} test and "
        f"{config['validation_per_site']} validation patients held out), the bench's network "
        f"{json.dumps(config['bundle'])}. Pre-training: {config['pretrain_steps']} steps in "
        f"{config['pretrain_rounds']} rounds (the bench's 96 steps in 4 rounds would never reach DP's T = 5 "
        "safety sync), batch "
        f"{config['batch_size']} volumes; settings of methods whose message sizes do not depend on the "
        "training (every method but FCLOpt+PTNU+DP) ran bytes-only with one local step a round. "
        "Fine-tuning (Dice settings): the label-efficiency protocol's `finetune_unit` as it is on main, "
        f"local mode (each site alone from the global encoder), N = {min(config['budgets'])} labelled volume "
        f"per site, {config['finetune_steps']} steps of {config['finetune_batch_samples']} slices, "
        f"lr {config['finetune_lr']}; the score is the last checkpoint's Dice on each site's test patients.",
        "",
        "Bytes: `count_bytes` (ndarray.nbytes) on the messages as sent, per site and round, mean over "
        "sites, rounds and seeds, in KB (1024 bytes). Uploads: share of site-rounds that sent their target; "
        "target gap: ‖ξ_srv - ξ_pred‖ / ‖ξ_srv‖, the server's target (built from the uploaded real targets) "
        "against the sites' prediction, mean over the rounds in which some site uploaded, and in the last "
        "round when every site uploaded (the T sync). The floor is FedAvg of FCLOpt's online network alone "
        f"(encoder, head, predictor) up and down at float32: {kb(summary['floor_bytes_per_site_round'])} KB.",
        "",
        "| setting | seeds | " + " | ".join(kinds) + " | total | x fedbyol | x floor | uploads | "
        "corrections / run | target gap: mean / last round |",
        "|---|" + "---|" * (len(kinds) + 7),
    ]
    for name, row in rows.items():
        b = row["bytes_per_site_round"]
        uploads = "" if row["uploads"] is None else f"{100 * row['uploads']:.0f}%"
        corrections = "" if row["corrections_per_run"] is None else f"{row['corrections_per_run']:.1f}"
        gap = "" if row["target_gap"] is None else f"{row['target_gap']:.1e}"
        if row["last_round_gap"] is not None:
            gap += f" / {row['last_round_gap']:.1e}"
        lines.append(
            f"| {name} | {len(row['seeds'])} | "
            + " | ".join(kb(b.get(k, 0.0)) for k in kinds)
            + f" | {kb(b['total'])} | {row['fedbyol_ratio']:.3f} | {row['floor_ratio']:.3f} | {uploads} "
            f"| {corrections} | {gap} |"
        )
    scored = {n: r for n, r in rows.items() if "dice" in r}
    if scored:
        lines += [
            "",
            "## Fine-tuned Dice",
            "",
            "Mean over the (seed, site) scores with its 95% percentile bootstrap interval; the paired "
            "difference is the setting minus its reference on the same seed, site and split, with the 95% "
            "bootstrap interval over the (seed, site) pairs and, beside it, the interval resampling whole "
            "seeds (`fedcontrast.bench.stats`).",
            "",
            "| setting | Dice [95% CI] | pairs | minus | paired difference [95% CI] | [95% CI, seeds] |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in scored.items():
            paired = row.get("dice_paired")
            by_seed = (
                f"[{paired['seed_ci_low']:+.3f}, {paired['seed_ci_high']:+.3f}]"
                if paired and paired["n_seeds"] > 1
                else "one seed"
            )
            diff = f"{row['reference']} | {_ci(paired, True)} | {by_seed}" if paired else " | | "
            lines.append(f"| {name} | {_ci(row['dice'])} | {row['dice']['n_pairs']} | {diff} |")
    if meta["not_run"]:
        lines += ["", "Not run (budget): " + ", ".join(f"{n} (seed {s})" for n, s in meta["not_run"]) + "."]
    lines += ["", "## Targets (issue 16)", "", *meta["verdicts"]]
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    """The short commit of this checkout ("unknown" outside git)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(
    entries: list[dict[str, Any]],
    config: BenchConfig,
    report: Path,
    meta: dict[str, Any],
) -> dict[str, Any] | None:
    """Summarise ``entries`` and (re)write ``report``.json and .md; None while there is no fedbyol run."""
    if not any(e["setting"] == "fedbyol" for e in entries):
        return None
    summary = summarise(entries, config)
    meta = {**meta, "bench_config": asdict(config), "verdicts": verdicts(summary)}
    report.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, **summary, "runs": entries}
    output_file(report, ".json").write_text(json.dumps(payload, indent=1, default=str))
    output_file(report, ".md").write_text(render(summary, meta))
    return summary


def main() -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("workspace/comm-sweep"))
    parser.add_argument("--report", type=Path, default=Path("benchmarks/results/communication"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--patients-per-site", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5, help="pre-training rounds (DP's T = 5 sync needs 5)")
    parser.add_argument("--pretrain-steps", type=int, default=100, help="pre-training steps per site in all")
    parser.add_argument(
        "--budget-min", type=float, default=math.inf, help="start no run that would end later"
    )
    parser.add_argument("--only", nargs="+", help="run only these settings (names as in SETTINGS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = replace(
        defaults,
        methods=[],
        seeds=args.seeds,
        sites=args.sites,
        patients_per_site=args.patients_per_site,
        pretrain_rounds=args.rounds,
        pretrain_steps=args.pretrain_steps,
        # the smallest of the bench's budgets; steps, checkpoints, batch, lr, held-out patients: its defaults
        budgets=[min(defaults.budgets)],
    )
    schedule = [(n, i) for n, i in SCHEDULE if not args.only or n in args.only]
    start = time.perf_counter()
    meta = {
        "command": "python " + shlex.join(sys.argv),
        "environment": environment(),
        "main_commit": git_commit(),
        "load_average_start": os.getloadavg()[0],
    }

    def report(entries: list[dict[str, Any]], not_run: list | None = None) -> None:
        done = {(e["setting"], e["seed"]) for e in entries}
        pending = [(n, config.seeds[i]) for n, i in SCHEDULE if i < len(config.seeds)]
        meta_now = {
            **meta,
            "wall_min": (time.perf_counter() - start) / 60,
            "load_average_end": os.getloadavg()[0],
            "not_run": [j for j in pending if j not in done],
        }
        write_report(entries, config, args.report, meta_now)

    entries, skipped = run_sweep(config, args.out, schedule, args.budget_min * 60, report)
    report(entries)
    if skipped:
        logger.info("not run (budget): %s", skipped)


if __name__ == "__main__":
    main()
