"""Result files, markdown reports and plots of a benchmark run.

Every JSON file follows the project's results format: ``dataset``, ``config``,
``environment`` and ``rows`` (one per method, fine-tuning mode, label budget, seed and
site). Tables are in the published shape: methods as rows, label budgets as columns,
mean ± std across sites of the per-site mean over seeds. Every sentence is computed from
the numbers.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from fedcontrast.bench.evaluate import CLASS_NAMES
from fedcontrast.bench.protocol import MODES, RANDOM_INIT, BenchConfig, pretrain_records

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
]


def environment() -> dict[str, Any]:
    """Versions, processor and date of this run."""
    import monai
    import nvflare
    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "nvflare": nvflare.__version__,
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": date.today().isoformat(),
    }


def dataset_info(config: BenchConfig, run_dir: Path) -> dict[str, Any]:
    """What the run used: the phantom's description (or the dataset folder) and the split."""
    phantom = run_dir / "data" / "phantom.json"
    info: dict[str, Any] = {
        "name": "fedcontrast phantom" if phantom.exists() else str(run_dir),
        "sites": config.sites,
        "patients_per_site": config.patients_per_site,
        "volumes_per_site": 2 * config.patients_per_site,
        "test_patients_per_site": config.test_per_site,
        "size": config.size,
        "seed": config.data_seed,
    }
    if phantom.exists():
        summary = json.loads(phantom.read_text())
        info["image_size"] = summary.get("sites") or summary.get("scanners") or summary
    return info


def result_document(rows: list[dict[str, Any]], config: BenchConfig, run_dir: Path) -> dict[str, Any]:
    """The results-format object for ``rows``."""
    return {
        "dataset": dataset_info(config, run_dir),
        "config": asdict(config),
        "environment": environment(),
        "rows": [{k: row[k] for k in RESULT_KEYS} for row in rows],
    }


def site_means(rows: Iterable[dict[str, Any]], value) -> dict[tuple[str, str, int], list[float]]:
    """(mode, method, N) -> the per-site means over seeds of ``value(row)`` (NaN-free)."""
    per_site: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        v = value(row)
        if v is not None and np.isfinite(v):
            per_site[row["finetune"], row["method"], row["n_labeled"], row["site"]].append(v)
    grouped: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for (mode, method, n, _site), values in sorted(per_site.items()):
        grouped[mode, method, n].append(float(np.mean(values)))
    return grouped


def table(
    rows: list[dict[str, Any]], mode: str, methods: Sequence[str], budgets: Sequence[int], value
) -> str:
    """Markdown: methods as rows, N as columns, mean ± std across sites."""
    grouped = site_means(rows, value)
    lines = ["| method | " + " | ".join(f"N={n}" for n in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for method in methods:
        cells = []
        for n in budgets:
            values = grouped.get((mode, method, n))
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking(rows: list[dict[str, Any]], mode: str, n: int, methods: Sequence[str]) -> list[str]:
    """Methods ordered by mean Dice (best first) for one column."""
    grouped = site_means(rows, lambda r: r["dice_mean"])
    scored = [(np.mean(grouped[mode, m, n]), m) for m in methods if grouped.get((mode, m, n))]
    return [m for _, m in sorted(scored, reverse=True)]


def ordering_sentences(
    rows: list[dict[str, Any]], budgets: Sequence[int], methods: Sequence[str]
) -> list[str]:
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


def bytes_table(rows: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """Per method: mean per-site pre-training bytes by kind (MB), wall times and peak memory."""
    kinds = ("weights", "target", "features")
    header = ["method", *(f"{k} {d} (MB)" for k in kinds for d in ("up", "down"))]
    header += ["pre-train wall (s)", "fine-tune wall (s)", "peak RSS of a unit (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        cells = [
            f"{np.mean([r['bytes_by_kind'][f'{k}_{d}'] for r in sel]) / 1e6:.2f}"
            for k in kinds
            for d in ("up", "down")
        ]
        cells += [
            f"{np.mean([r['pretrain_wall_s'] for r in sel]):.0f}",
            f"{np.mean([r['finetune_wall_s'] for r in sel]):.0f}",
            f"{max(r['peak_rss_mb'] for r in sel):.0f}",
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_units(rows: list[dict[str, Any]], config: BenchConfig) -> list[str]:
    """Units of the configured grid that have no rows (an interrupted or partial run)."""
    from fedcontrast.bench.protocol import finetune_units

    done = {r["unit"] for r in rows}
    return [u.key for u in finetune_units(config) if u.key not in done]


def plot_dice(rows: list[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int], path: Path) -> None:
    """Mean Dice against N per method, local and federated side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = site_means(rows, lambda r: r["dice_mean"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, MODES):
        for method in methods:
            ns = [n for n in budgets if grouped.get((mode, method, n))]
            if ns:
                means = [np.mean(grouped[mode, method, n]) for n in ns]
                stds = [np.std(grouped[mode, method, n]) for n in ns]
                ax.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(budgets), [str(n) for n in budgets])
        ax.set_xlabel("labelled volumes per site (N)")
        ax.set_title(f"{mode} fine-tuning")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice (RV, MYO, LV)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(rows: list[dict[str, Any]], methods: Sequence[str], path: Path) -> None:
    """Pre-training bytes per site (up + down) by kind, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m != RANDOM_INIT and any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bottom = np.zeros(len(shown))
    for kind in ("weights", "target", "features"):
        values = np.array(
            [
                np.mean(
                    [
                        r["bytes_by_kind"][f"{kind}_up"] + r["bytes_by_kind"][f"{kind}_down"]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(examples_dir: Path, methods: Sequence[str], path: Path) -> bool:
    """Image, ground truth and prediction of one test slice per method (federated); False if none saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(m, examples_dir / f"{m}_federated.npz") for m in methods]
    found = [(m, p) for m, p in found if p.exists()]
    if not found:
        return False
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
                    mask, cmap="viridis", vmin=0, vmax=3, alpha=0.6, origin="lower", interpolation="nearest"
                )
            ax.set_title(f"{method}: {title}" if title == "image" else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], config: BenchConfig, run_dir: Path, out_dir: Path) -> Path:
    """Write ``results.json``, ``report.md`` and the plots of the comparison to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result_document(rows, config, run_dir), indent=1))
    methods, budgets = config.methods, sorted(config.budgets)
    plot_dice(rows, methods, budgets, out_dir / "dice_vs_n.png")
    plot_bytes(rows, methods, out_dir / "bytes.png")
    has_examples = plot_examples(run_dir / "examples", methods, out_dir / "examples.png")
    missing = missing_units(rows, config)
    parts = [
        "# Comparison of pre-training methods (SPEC §7 protocol)\n",
        f"{config.sites} sites, {len(config.seeds)} seeds, N = {', '.join(map(str, budgets))} labelled "
        f"volumes per site; pre-training {config.pretrain_rounds} rounds x {config.pretrain_epochs} epoch(s),"
        " fine-tuning "
        f"{config.finetune_rounds} rounds x {config.finetune_epochs} epochs; network {config.network}. "
        f"Dice is the mean over RV, MYO and LV on each site's held-out test patient; cells are mean ± std "
        f"across sites of the per-site mean over seeds. Environment: {environment()}.\n",
        f"{len(rows)} rows; "
        + (
            f"**{len(missing)} units missing**: {', '.join(missing)}.\n"
            if missing
            else "every unit of the grid completed.\n"
        ),
    ]
    for mode in MODES:
        parts += [
            f"\n## {mode.capitalize()} fine-tuning: mean Dice\n",
            table(rows, mode, methods, budgets, lambda r: r["dice_mean"]),
        ]
    for mode in MODES:
        for cls in CLASS_NAMES:
            parts += [
                f"\n### {mode.capitalize()} fine-tuning: {cls} Dice\n",
                table(rows, mode, methods, budgets, lambda r, c=cls: r["dice"][c]),
            ]
        parts += [
            f"\n### {mode.capitalize()} fine-tuning: HD95 (mm)\n",
            table(rows, mode, methods, budgets, lambda r: r["hd95_mean"]),
        ]
    parts += [
        "\n## Against the published ordering (SPEC §1)\n",
        *(f"- {s}" for s in ordering_sentences(rows, budgets, methods)),
    ]
    parts += ["\n## Bytes, time and memory per site\n", bytes_table(rows, methods)]
    parts += ["\n## Plots\n", "![Dice against N](dice_vs_n.png)\n", "![Bytes per method](bytes.png)\n"]
    if has_examples:
        parts.append(
            f"![Example test slices, federated, N={budgets[0]}, seed {config.seeds[0]}](examples.png)\n"
        )
    report = out_dir / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report


def write_subset(
    rows: list[dict[str, Any]],
    config: BenchConfig,
    run_dir: Path,
    path: Path,
    methods: Sequence[str],
    budgets: Sequence[int],
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A results-format file holding only ``methods`` x ``budgets`` of a run; returns those rows."""
    subset = [r for r in rows if r["method"] in methods and r["n_labeled"] in budgets]
    document = result_document(subset, config, run_dir)
    document["config"]["methods"], document["config"]["budgets"] = list(methods), list(budgets)
    document.update(extra or {})
    path.write_text(json.dumps(document, indent=1))
    return subset


def write_fcl_vs_baselines(
    rows: list[dict[str, Any]], config: BenchConfig, run_dir: Path, out_dir: Path
) -> Path:
    """Issue 4's comparison: FCL, random init, local CL and FedSimCLR at N = 1 and 2."""
    methods, budgets = ["random_init", "local_cl", "fedsimclr", "fcl"], [1, 2]
    subset = write_subset(rows, config, run_dir, out_dir / "fcl_vs_baselines.json", methods, budgets)
    seeds = sorted({r["seed"] for r in subset})
    parts = [
        "# FCL against its baselines\n",
        f"{config.sites} sites, seeds {seeds}, rows from the comparison run (`comparison/`). Mean Dice, "
        "mean ± std across sites.\n",
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
    rows: list[dict[str, Any]], config: BenchConfig, run_dir: Path, out_dir: Path
) -> Path:
    """Issue 5's communication comparison: bytes per site per round by kind, savings, floor, Dice."""
    methods, budgets = COMMUNICATION_METHODS, [1, 2]
    records = pretrain_records(run_dir, methods)
    per_round = bytes_per_round(records)
    total = {m: sum(v.values()) for m, v in per_round.items()}
    fclopt = per_round.get("fclopt", {})
    floor = fclopt.get("weights_up", 0.0) + fclopt.get("weights_down", 0.0)
    sync = target_sync_summary(records, config.sites)
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
        f"site and round, mean over {config.sites} sites, {config.pretrain_rounds} rounds and "
        f"{len(config.seeds)} seeds; same data and rounds for every method.\n",
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
