"""Bytes below the floor: the federated pre-training methods at full and reduced transfer
precision, DP's δ/T sweep, PTNU's optional target upload, prototypes against features.

Every setting pre-trains in process (``fedcontrast.bench.protocol.pretrain_unit``: the
methods' real protocol, the project's byte counter on the messages as they travel; with
``transfer`` float16/blockwise8 the networks are counted as encoded and every receiver gets
the decoded values, as through the NVFlare quantisation filters). Settings marked for Dice are
then fine-tuned and scored with the bench's fine-tuning pieces as they are
(``fedcontrast.bench.protocol.finetune_unit``, local mode, N labelled volumes per site).

Reported per setting: payload bytes per site and round by kind and direction, the ratio to
federated BYOL and to the floor (FedAvg of FCLOpt's online network alone, up and down, at
full precision), DP's uploads (fraction of site-rounds), corrections, the mean prediction gap
(``target_gap``) and the fine-tuned Dice (mean over sites and seeds, with a 95% t-interval
over the seed-site values).

    python benchmarks/communication_sweep.py --out workspace/comm-sweep \
        --report benchmarks/results/communication
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fedcontrast.bench.protocol import BenchConfig, FinetuneUnit, finetune_unit, prepare_splits, pretrain_unit
from fedcontrast.bench.report import environment
from fedcontrast.methods.base import select
from fedcontrast.methods.registry import get_method
from fedcontrast.nets.presets import network_preset

#: The bench's network (``BenchConfig``'s default), so the byte ratios are the bench's.
NETWORK = network_preset("small")
PRETRAIN: dict[str, Any] = {}

#: (name, method, config overrides, seeds fine-tuned for Dice: 0 = bytes only)
SETTINGS: list[tuple[str, str, dict[str, Any], int]] = [
    # in order of priority: the report is rewritten after every setting, so a run stopped at its
    # deadline still reports what it finished
    ("fcl", "fcl", {}, 0),
    ("fedbyol", "fedbyol", {}, 0),
    ("fclopt", "fclopt", {}, 0),
    ("fclopt_ptnu", "fclopt_ptnu", {}, 0),
    ("fclopt_ptnu_dp", "fclopt_ptnu_dp", {}, 2),
    ("fclopt_ptnu_dp fp16", "fclopt_ptnu_dp", {"transfer": "float16"}, 2),
    ("fclopt_ptnu+upload", "fclopt_ptnu", {"ptnu_upload": True}, 0),
    ("dp δ=0", "fclopt_ptnu_dp", {"delta": 0.0}, 1),
    ("dp δ=1e-4", "fclopt_ptnu_dp", {"delta": 1e-4}, 1),
    ("dp prototypes", "fclopt_ptnu_dp", {"exchange": "prototypes"}, 1),
    ("fclopt_ptnu_dp 8bit", "fclopt_ptnu_dp", {"transfer": "blockwise8"}, 1),
    ("fcl fp16", "fcl", {"transfer": "float16"}, 0),
    ("fedbyol fp16", "fedbyol", {"transfer": "float16"}, 0),
    ("fclopt fp16", "fclopt", {"transfer": "float16"}, 0),
    ("fclopt_ptnu fp16", "fclopt_ptnu", {"transfer": "float16"}, 0),
    ("dp δ=3e-5", "fclopt_ptnu_dp", {"delta": 3e-5}, 0),
    ("dp δ=3e-4", "fclopt_ptnu_dp", {"delta": 3e-4}, 0),
    ("dp δ=1e-3 T=1000", "fclopt_ptnu_dp", {"delta": 1e-3, "sync_every": 1000}, 0),
]


def run_setting(
    config: BenchConfig, name: str, method: str, seed: int, splits: dict, out: Path, dice: bool
) -> dict:
    """Pre-train one setting and seed; fine-tune and score it when ``dice``; returns its record."""
    folder = out / "pretrain" / f"{name.replace(' ', '_')}_s{seed}"
    record_file = folder / "record.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    if record is None:
        record = pretrain_unit(config, method, seed, splits, folder)
    result = {"setting": name, "method": method, "seed": seed, "record": record, "dice": None}
    if dice:
        unit = FinetuneUnit(method, seed, "local", min(config.budgets))
        rows = finetune_unit(config, unit, splits, folder, record, out / "examples")
        result["dice"] = {row["site"]: row["dice_mean"] for row in rows}
        result["finetune_wall_s"] = rows[0]["finetune_wall_s"]
    return result


def per_site_round(record: dict, rounds: int) -> dict[str, float]:
    """Bytes per site and round by ``<kind>_<direction>`` and in total."""
    sites = record["sites"]
    keys = sites[next(iter(sites))]["bytes_by_kind"]
    mean = {k: statistics.fmean(s["bytes_by_kind"][k] for s in sites.values()) / rounds for k in keys}
    stats = (
        statistics.fmean(s["pretrain_bytes_up"] + s["pretrain_bytes_down"] for s in sites.values()) / rounds
    )
    mean["total"] = stats
    return mean


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    return mean, t95.get(len(values) - 1, 2.0) * statistics.stdev(values) / math.sqrt(len(values))


def floor_bytes(config: BenchConfig) -> float:
    """FedAvg of FCLOpt's online network alone (encoder, head, predictor), up and down, float32."""
    initial = get_method("fclopt").trainer.initial_message(config.pretrain_config(0))
    return 2.0 * sum(v.nbytes for v in select(initial, "weights").values())


def summarise(results: list[dict], config: BenchConfig) -> dict[str, Any]:
    """One row per setting: bytes, ratios, DP bookkeeping, Dice."""
    rounds = config.pretrain_rounds
    floor = floor_bytes(config) * 1.0
    rows = {}
    for name, method, overrides, _ in SETTINGS:
        runs = [r for r in results if r["setting"] == name]
        if not runs:
            continue
        by_kind = [per_site_round(r["record"], rounds) for r in runs]
        keys = by_kind[0].keys()
        mean = {k: statistics.fmean(b[k] for b in by_kind) for k in keys}
        sync = [m for r in runs for m in r["record"]["server_metrics"] if "target_uploads" in m]
        sites = len(runs[0]["record"]["sites"])
        gaps = [m["target_gap"] for m in sync if "target_gap" in m]
        dice = [d for r in runs if r["dice"] for d in r["dice"].values()]
        row = {
            "method": method,
            "overrides": overrides,
            "seeds": [r["seed"] for r in runs],
            "bytes_per_site_round": mean,
            "floor_ratio": mean["total"] / floor,
            "uploads": (sum(m["target_uploads"] for m in sync) / (len(sync) * sites)) if sync else None,
            "corrections": sum(m["target_correction"] for m in sync) if sync else None,
            "target_gap": statistics.fmean(gaps) if gaps else None,
            "pretrain_wall_s": statistics.fmean(r["record"]["wall_s"] for r in runs),
        }
        if dice:
            row["dice_mean"], row["dice_ci95"] = t_interval(dice)
            row["dice_values"] = dice
        rows[name] = row
    fedbyol = rows["fedbyol"]["bytes_per_site_round"]["total"]
    for row in rows.values():
        row["fedbyol_ratio"] = row["bytes_per_site_round"]["total"] / fedbyol
    return {"floor_bytes_per_site_round": floor, "settings": rows}


def kb(value: float | None) -> str:
    return "" if value is None else f"{value / 1024:.1f}"


def render(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown report."""
    rows = summary["settings"]
    kinds = ["weights_down", "weights_up", "target_down", "target_up", "features_down", "features_up"]
    lines = [
        "# Communication of the federated pre-training methods: precision, DP's δ/T, PTNU's upload",
        "",
        f"Written by `{meta['command']}` on {meta['environment']['date']} "
        f"({meta['environment']['cpu']}, CPU only: no GPU was lent to this task), "
        f"{meta['wall_min']:.1f} min wall.",
        "",
        f"Setup: {meta['sites']} sites x {meta['patients_per_site']} phantom patients, "
        f"{meta['pretrain_rounds']} pre-training rounds, the bench's network {json.dumps(NETWORK)}; "
        f"seeds: as many of {meta['seeds']} as the setting fine-tunes (see the JSON), seed "
        f"{meta['seeds'][0]} for bytes-only settings. Fine-tuning: "
        "`fedcontrast.bench.protocol.finetune_unit` as on main at "
        f"{meta['main_commit']}, local mode, N = {meta['n_labeled']} labelled volume(s) per site, "
        f"{meta['finetune_rounds']} rounds x {meta['finetune_epochs']} epochs. Dice is the mean over "
        "sites and seeds with the half-width of its 95% t-interval; at this size it separates "
        "only large differences.",
        "",
        "Bytes: `count_bytes` (ndarray.nbytes) on the messages as sent, per site and round, mean over "
        "sites, rounds and seeds, in KB. The floor is FedAvg of FCLOpt's online network alone "
        f"(encoder, head, predictor) up and down at float32: {kb(summary['floor_bytes_per_site_round'])} KB.",
        "",
        "| setting | " + " | ".join(kinds) + " | total | x fedbyol | x floor | uploads | corrections "
        "| target gap | Dice |",
        "|---|" + "---|" * (len(kinds) + 8),
    ]
    for name, row in rows.items():
        b = row["bytes_per_site_round"]
        dice = f"{row['dice_mean']:.3f} ± {row['dice_ci95']:.3f}" if "dice_mean" in row else ""
        uploads = "" if row["uploads"] is None else f"{100 * row['uploads']:.0f}%"
        corrections = "" if row["corrections"] is None else f"{row['corrections']:.0f}"
        gap = "" if row["target_gap"] is None else f"{row['target_gap']:.1e}"
        lines.append(
            f"| {name} | "
            + " | ".join(kb(b.get(k, 0.0)) for k in kinds)
            + f" | {kb(b['total'])} | {row['fedbyol_ratio']:.2f} | {row['floor_ratio']:.2f} | {uploads} "
            f"| {corrections} | {gap} | {dice} |"
        )
    if meta["not_finished"]:
        lines += ["", f"Not run (the sweep was stopped at its deadline): {', '.join(meta['not_finished'])}."]
    lines += ["", "## Targets", ""] + meta["verdicts"]
    return "\n".join(lines) + "\n"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Plain statements of what met the issue's targets and what missed."""
    rows = summary["settings"]
    out = []
    dp, dp16 = rows.get("fclopt_ptnu_dp"), rows.get("fclopt_ptnu_dp fp16")
    if dp:
        ok = dp["fedbyol_ratio"] <= 0.55
        weights_only = (
            summary["floor_bytes_per_site_round"] / rows["fedbyol"]["bytes_per_site_round"]["total"]
        )
        out.append(
            f"- FCLOpt+PTNU+DP at full precision: {dp['fedbyol_ratio']:.2f}x federated BYOL's bytes "
            f"(target <= 0.55x): {'met' if ok else 'MISSED'}. Its online weights alone, up and down, are "
            f"{weights_only:.2f}x "
            "federated BYOL's bytes, so no target schedule reaches 0.55x at float32."
        )
    if dp16:
        ok = dp16["floor_ratio"] <= 0.6
        out.append(
            f"- FCLOpt+PTNU+DP with float16 transfer: {dp16['floor_ratio']:.2f}x the floor "
            f"(target <= 0.6x): {'met' if ok else 'MISSED'}."
        )
    if dp and dp16 and "dice_mean" in dp and "dice_mean" in dp16:
        inside = abs(dp16["dice_mean"] - dp["dice_mean"]) <= dp["dice_ci95"]
        out.append(
            f"- Dice with float16: {dp16['dice_mean']:.3f} against {dp['dice_mean']:.3f} ± "
            f"{dp['dice_ci95']:.3f} at full precision: {'inside' if inside else 'OUTSIDE'} the interval."
        )
    ptnu, loud = rows.get("fclopt_ptnu"), rows.get("fclopt_ptnu+upload")
    if ptnu and loud and "dice_values" in ptnu and "dice_values" in loud:
        same = ptnu["dice_values"] == loud["dice_values"]
        out.append(
            f"- PTNU's every-round target upload: {kb(loud['bytes_per_site_round']['total'])} KB against "
            f"{kb(ptnu['bytes_per_site_round']['total'])} KB per site and round without it; fine-tuned Dice "
            f"{'identical' if same else 'different'} ({loud['dice_mean']:.3f} vs {ptnu['dice_mean']:.3f}). "
            "The upload only feeds the server's target_gap metric, so it is off by default (`ptnu_upload`)."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("workspace/comm-sweep"))
    parser.add_argument("--report", type=Path, default=Path("benchmarks/results/communication"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--patients-per-site", type=int, default=4)
    parser.add_argument("--only", nargs="+", help="run only these settings (names as in SETTINGS)")
    parser.add_argument("--main-commit", default="unknown", help="commit of main whose bench pieces are used")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = BenchConfig(
        methods=[],
        budgets=[1],
        seeds=args.seeds,
        sites=args.sites,
        patients_per_site=args.patients_per_site,
        pretrain_rounds=args.rounds,
        finetune_rounds=1,
        finetune_epochs=4,
        network=dict(NETWORK),
        pretrain_overrides=dict(PRETRAIN),
    )
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = prepare_splits(config, args.out)[1]
    jobs = []
    for name, method, overrides, dice_seeds in SETTINGS:
        if args.only and name not in args.only:
            continue
        setting_config = replace(config, pretrain_overrides={**PRETRAIN, **overrides})
        for i, seed in enumerate(args.seeds[: max(dice_seeds, 1)]):
            jobs.append((setting_config, name, method, seed, splits, args.out, i < dice_seeds))
    results = []
    for job in jobs:  # one after the other in this process (no start-up per unit)
        results.append(run_setting(*job))
        logging.info("done: %s seed %d", results[-1]["setting"], results[-1]["seed"])
        write_report(results, config, args, start)


def write_report(results: list[dict], config: BenchConfig, args: argparse.Namespace, start: float) -> None:
    """Summarise the finished settings and (re)write the JSON and markdown reports."""
    if not any(r["setting"] == "fedbyol" for r in results):
        return  # the ratios need federated BYOL's row (the second setting)
    summary = summarise(results, config)
    meta = {
        "command": f"python benchmarks/communication_sweep.py --rounds {args.rounds} --sites {args.sites} "
        f"--seeds {' '.join(map(str, args.seeds))}",
        "environment": environment(),
        "wall_min": (time.perf_counter() - start) / 60,
        "sites": config.sites,
        "patients_per_site": config.patients_per_site,
        "pretrain_rounds": config.pretrain_rounds,
        "seeds": args.seeds,
        "n_labeled": 1,
        "finetune_rounds": config.finetune_rounds,
        "finetune_epochs": config.finetune_epochs,
        "main_commit": args.main_commit,
        "not_finished": [
            name
            for name, *_ in SETTINGS
            if name not in summary["settings"] and not (args.only and name not in args.only)
        ],
    }
    meta["verdicts"] = verdicts(summary)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "bench_config": asdict(config), **summary, "runs": results}
    args.report.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    args.report.with_suffix(".md").write_text(render(summary, meta))


if __name__ == "__main__":
    main()
