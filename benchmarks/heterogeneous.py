"""Heterogeneous sites: local training only, FedAvg, FedProx and FedCRLD, per-site Dice (issue 13).

Four (or more) phantom sites that differ by sequence (bSSFP and spoiled gradient echo) and,
more strongly than the default phantom, by scanner contrast, bias field and noise
(``synthesize_dataset(..., sequences=..., site_shift=...)``). Every method trains the same
number of rounds and local epochs on the same labelled volumes, supervised, with all training
labels and with N labelled volumes per site; every site's held-out test patient is scored
with the bundle's network, preprocessing and inferer (:class:`~fedcontrast.bench.evaluate.BundleScorer`):

- ``local_only``: the ``supervised`` method, each site alone (its own model);
- ``fedavg``: ``supervised`` with FedAvg of the whole network (one global model);
- ``fedprox``: FedAvg plus NVFlare's FedProx term (one global model);
- ``fedcrld``: only the shared encoder averaged; each site scored with its own model.

Each run is the method's real protocol in one process
(:func:`~fedcontrast.methods.runner.run_in_process`: the trainer and strategy calls the NVFlare
jobs make, and the project's byte counter on the same messages). Rows follow
RESULTS_FORMAT (``results.json``); ``report.md`` has the per-site tables, where FedCRLD stands
against FedAvg and FedProx at every site, the most different site, bytes and times;
``per_site_dice.png`` the per-site Dice of every method. Finished runs are appended to
``work/rows.jsonl`` so an interrupted run resumes; ``--deadline-min`` stops starting new runs
after that many minutes and the report says what is missing.

    nice -n 15 python benchmarks/heterogeneous.py --out benchmarks/results/heterogeneous
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcontrast.bench.environment import environment
from fedcontrast.bench.evaluate import BundleScorer
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import LABELS, synthesize_dataset
from fedcontrast.data.readers import read_acdc, read_dataset
from fedcontrast.data.splits import site_names, write_site_splits
from fedcontrast.methods.base import KINDS, message_to_state_dict
from fedcontrast.methods.fedcrld import SITE_MODEL_FILE, network_overrides
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.bundle import build_preprocessing
from fedcontrast.nets.presets import network_preset

#: Benchmark method -> (registered method, federated, its config over the common one).
METHODS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "local_only": ("supervised", False, {}),
    "fedavg": ("supervised", True, {}),
    "fedprox": ("fedprox", True, {}),
    "fedcrld": ("fedcrld", True, {}),
    # ablation (not run by default): FedCRLD without momentum distillation
    "fedcrld_nodistill": ("fedcrld", True, {"distill_weight": 0.0, "feature_weight": 0.0}),
}
DEFAULT_METHODS = ("local_only", "fedavg", "fedprox", "fedcrld")
PUBLISHED = (
    "FedCRLD (Qi et al., MICCAI 2022): 85.96% average Dice over 6 sites (420 CMR images, 2 public datasets)"
)
ALL = "all"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heterogeneous"))
    parser.add_argument(
        "--work", type=Path, help="data, splits and rows.jsonl (default OUT/../.heterogeneous-work)"
    )
    parser.add_argument(
        "--dataset", type=Path, help="real data instead of the phantom, e.g. M&Ms (sites = vendors)"
    )
    parser.add_argument("--format", choices=["mnms", "acdc", "decathlon"], default="mnms")
    parser.add_argument("--site-key", default="vendor", help="M&Ms: vendor or centre")
    parser.add_argument("--sequences", nargs="+", default=["bssfp", "bssfp", "bssfp", "gre"])
    parser.add_argument("--site-shift", type=float, default=2.5)
    parser.add_argument("--patients-per-site", type=int, default=4)
    parser.add_argument("--test-per-site", type=int, default=1)
    parser.add_argument("--budgets", nargs="+", default=["2", "4", ALL])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--deadline-min", type=float, default=14.0, help="start no run after this (0: none)")
    parser.add_argument(
        "--bundle",
        type=json.loads,
        default=network_preset("small", blocks_down=[1, 1, 1], patch_size=[32, 32, 8]),
        help="bundle overrides (JSON)",
    )
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path) -> tuple[dict[str, dict[str, Path]], dict[str, int]]:
    """The phantom and one split per budget (same test patients); returns budget -> site -> file,
    and budget -> labelled volumes per site."""
    if args.dataset:
        cache = work / "mnms-cache" if args.format == "mnms" else None
        site_key = None if args.format == "acdc" else args.site_key
        entries, labels = read_dataset(args.dataset, args.format, site_key=site_key, cache_dir=cache)
    else:
        data = work / "data"
        if not (data / "phantom.json").is_file():
            synthesize_dataset(
                data,
                sites=len(args.sequences),
                patients_per_site=args.patients_per_site,
                seed=args.data_seed,
                size="small",
                sequences=list(args.sequences),
                site_shift=args.site_shift,
            )
        entries, labels = read_acdc(data), LABELS
    by_site: dict[str, int] = {}
    for entry in entries:
        by_site[str(entry["site"])] = by_site.get(str(entry["site"]), 0) + ("label" in entry)
    # "all": every labelled training volume of the smallest site (every phantom site: all of its own);
    # two labelled volumes (ED, ES) per test patient
    train_volumes = min(by_site.values()) - 2 * args.test_per_site
    splits, counts = {}, {}
    for budget in args.budgets:
        n = train_volumes if budget == ALL else int(budget)
        if not 1 <= n <= train_volumes:
            raise SystemExit(
                f"budget {budget}: the smallest site has {train_volumes} labelled training volumes"
            )
        folder = work / "splits" / f"n{budget}"
        if not (folder / "index.json").is_file():
            write_site_splits(entries, labels, folder, n, args.test_per_site, seed=args.data_seed)
        sites = site_names(len(by_site))
        splits[budget] = {site: folder / f"{site}.json" for site in sites}
        counts[budget] = n
    return splits, counts


def site_profiles(splits: dict[str, Path], bundle: dict[str, Any]) -> dict[str, list[float]]:
    """Per site: mean normalised intensity of each class (background, RV, MYO, LV) over its
    labelled training volumes, after the bundle's preprocessing (what the network sees)."""
    preprocessing = build_preprocessing(None, bundle)
    profiles = {}
    for site, path in splits.items():
        sums = np.zeros(4)
        counts = np.zeros(4)
        for entry in load_site_datalist(path)["training"]:
            item = preprocessing({"image": entry["image"], "label": entry["label"]})
            image, label = np.asarray(item["image"][0]), np.asarray(item["label"][0]).astype(int)
            for c in range(4):
                sums[c] += image[label == c].sum()
                counts[c] += (label == c).sum()
        profiles[site] = (sums / np.maximum(counts, 1)).round(4).tolist()
    return profiles


def most_different(profiles: dict[str, list[float]]) -> tuple[str, dict[str, float]]:
    """The site whose class-intensity profile is furthest (mean Euclidean distance) from the others'."""
    sites = list(profiles)
    vec = {s: np.array(profiles[s]) for s in sites}
    gaps = {s: float(np.mean([np.linalg.norm(vec[s] - vec[o]) for o in sites if o != s])) for s in sites}
    return max(gaps, key=gaps.get), {s: round(g, 4) for s, g in gaps.items()}


def unit_key(method: str, budget: str, seed: int) -> str:
    return f"{method}|{budget}|{seed}"


def run_unit(
    args: argparse.Namespace,
    method: str,
    budget: str,
    n_labeled: int,
    seed: int,
    splits: dict[str, Path],
    scorers: dict[str, BundleScorer],
) -> list[dict[str, Any]]:
    """Train one method on every site (one budget, one seed) and score every site's test set."""
    registered, federated, overrides = METHODS[method]
    datalists = {site: [dict(e) for e in load_site_datalist(p)["training"]] for site, p in splits.items()}
    with tempfile.TemporaryDirectory(prefix="hetero-") as workdir:
        config = {
            "bundle": args.bundle,
            "seed": seed,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "num_workers": 0,
            "workdir": workdir,
            **({"mu": args.mu} if registered == "fedprox" else {}),
            **overrides,
        }
        start = time.perf_counter()
        result = run_in_process(registered, config, datalists, rounds=args.rounds, federated=federated)
        wall = time.perf_counter() - start
        if registered == "fedcrld":
            models = {
                s: torch.load(Path(workdir) / s / SITE_MODEL_FILE, weights_only=True) for s in datalists
            }
            scorer = scorers["fedcrld"]
        elif federated:
            global_state = message_to_state_dict(result.global_message)
            models = dict.fromkeys(datalists, global_state)
            scorer = scorers["plain"]
        else:
            models = {s: message_to_state_dict(result.final_messages[s]) for s in datalists}
            scorer = scorers["plain"]
    rows = []
    for site in datalists:
        up = {k: 0 for k in KINDS}
        down = {k: 0 for k in KINDS}
        for record in result.history:
            if record["site"] == site:
                for k in KINDS:
                    up[k] += record["bytes_up"].get(k, 0)
                    down[k] += record["bytes_down"].get(k, 0)
        score = scorer.score(models[site], site)
        rows.append(
            {
                "method": method,
                "finetune": "federated" if federated else "local",
                "n_labeled": n_labeled,
                "budget": budget,
                "seed": seed,
                "site": site,
                **score,
                "pretrain_bytes_up": 0,
                "pretrain_bytes_down": 0,
                "train_bytes_up": sum(up.values()),
                "train_bytes_down": sum(down.values()),
                "bytes_by_kind": {f"{k}_{d}": v[k] for k in KINDS for d, v in (("up", up), ("down", down))},
                "pretrain_wall_s": 0.0,
                "finetune_wall_s": round(sum(r["seconds"] for r in result.history if r["site"] == site), 2),
                "run_wall_s": round(wall, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    return rows


def fmt(values: list[float]) -> str:
    """``mean ± std`` over seeds (std with ddof=0; one value: no ±)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def write_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    out: Path,
    meta: dict[str, Any],
    missing: list[str],
    command: str,
) -> None:
    """results.json, report.md and per_site_dice.png."""
    out.mkdir(parents=True, exist_ok=True)
    sites = meta["sites"]
    odd = meta["most_different_site"]
    methods = [m for m in METHODS if m in args.methods]
    if args.dataset:
        dataset: dict[str, Any] = {"name": f"{args.format} {args.dataset}", "site_key": args.site_key}
        described = (
            f"{len(sites)} sites of {args.format} `{args.dataset}` (by {args.site_key}), "
            f"{args.test_per_site} test patient(s) a site"
        )
    else:
        dataset = {
            "name": "fedcontrast phantom (small), heterogeneous sites",
            "sequences": dict(zip(sites, args.sequences)),
            "site_shift": args.site_shift,
            "patients_per_site": args.patients_per_site,
            "image_size": "about 48 x 48 x 8 voxels (small phantom), preprocessed to roi_size",
        }
        described = (
            f"{len(sites)} phantom sites, sequences "
            + ", ".join(f"{s} {q}" for s, q in zip(sites, args.sequences))
            + f"; per-site scanner shifts x{args.site_shift} of the default phantom's (tissue contrast,"
            " bias field; noise x its square root). "
            f"{args.patients_per_site} patients a site, {args.test_per_site} held out for testing "
            f"({2 * args.test_per_site} volumes)"
        )
    results = {
        "dataset": {
            **dataset,
            "sites": sites,
            "test_patients_per_site": args.test_per_site,
            "training_volumes_per_site": meta["training_volumes"],
            "data_seed": args.data_seed,
            "class_intensity_profiles": meta["profiles"],
            "profile_gap": meta["gaps"],
            "most_different_site": odd,
        },
        "config": {
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "fedprox_mu": args.mu,
            "fedcrld": "defaults of fedcontrast.methods.fedcrld.DEFAULTS",
            "method_overrides": {m: METHODS[m][2] for m in methods},
            "budgets": args.budgets,
            "seeds": args.seeds,
            "bundle": args.bundle,
            "command": command,
            "missing_units": missing,
        },
        "environment": environment(),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))

    def dice(method: str, budget: str, site: str | None = None) -> dict[int, float]:
        """seed -> Dice (the site's, or the mean over sites)."""
        by_seed: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == method and r["budget"] == budget and (site is None or r["site"] == site):
                by_seed.setdefault(r["seed"], []).append(r["dice_mean"])
        return {s: float(np.mean(v)) for s, v in by_seed.items() if site is not None or len(v) == len(sites)}

    lines = [
        "# Heterogeneous sites: local only, FedAvg, FedProx, FedCRLD",
        "",
        f"Written by `{command}`.",
        "",
        f"{described}, {meta['training_volumes']} labelled training volumes a site at most. "
        f"Every method: {args.rounds} rounds x {args.local_epochs} local epochs, batch {args.batch_size}, "
        f"lr {args.lr}, the bundle network {json.dumps(args.bundle)}; seeds {args.seeds}. "
        "Dice: mean foreground Dice (RV, MYO, LV) on the site's test volumes; tables give mean ± std "
        "over seeds.",
        "",
        f"**Most different site: {odd}.** Per site, the mean normalised intensity of background, RV, "
        "MYO and LV on its training volumes after the bundle's preprocessing; the site furthest (mean "
        "Euclidean distance) from the others: "
        + ", ".join(f"{s} {meta['gaps'][s]:.3f}" for s in sites)
        + "."
        + (
            ""
            if args.dataset
            else " The measure is taken after z-score normalisation, so it need not pick the site "
            "of the minority sequence ("
            + ", ".join(s for s, q in zip(sites, args.sequences) if args.sequences.count(q) * 2 < len(sites))
            + ")."
        ),
        "",
        f"Published context: {PUBLISHED}. Not comparable: real scans, 400 rounds x 5 epochs; here "
        "a CPU-sized budget" + ("." if args.dataset else " on tiny phantom volumes."),
        "",
    ]
    if missing:
        lines += [f"**Not run (deadline):** {', '.join(missing)}.", ""]
    units = {(r["method"], r["budget"], r["seed"]): r["run_wall_s"] for r in rows}
    lines += [
        f"Runs finished: {len(units)} (method, budget, seed) units; their training took "
        f"{sum(units.values()) / 60:.1f} min of wall time in all (one process, `nice -n 15`, "
        f"torch on one thread).",
        "",
    ]
    for budget in args.budgets:
        n = meta["counts"][budget]
        title = f"all training labels (N = {n})" if budget == ALL else f"N = {n} labelled volumes per site"
        lines += [f"## {title}", "", "| method | " + " | ".join(
            f"**{s}**" if s == odd else s for s in sites
        ) + " | mean over sites |", "|---" * (len(sites) + 2) + "|"]  # fmt: skip
        for method in methods:
            cells = [fmt(list(dice(method, budget, s).values())) for s in sites]
            cells.append(fmt(list(dice(method, budget).values())))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        for variant in (m for m in methods if m.startswith("fedcrld")):
            for baseline in ("fedavg", "fedprox", "local_only", "fedcrld"):
                if baseline not in methods or baseline == variant:
                    continue
                diffs = []
                for s in sites:
                    a, b = dice(variant, budget, s), dice(baseline, budget, s)
                    paired = [a[k] - b[k] for k in a if k in b]
                    diffs.append((s, paired))
                text = "; ".join(
                    f"{s} {np.mean(d):+.3f} (wins {sum(x > 0 for x in d)}/{len(d)} seeds)"
                    for s, d in diffs
                    if d
                )
                ahead = [s for s, d in diffs if d and np.mean(d) > 0]
                lines.append(
                    f"- {variant} minus {baseline} (paired by seed): {text}. {variant} is ahead at "
                    f"{len(ahead)} of {len(sites)} sites{' (' + ', '.join(ahead) + ')' if ahead else ''}; "
                    f"at the most different site {odd}: "
                    + (f"{np.mean(dict(diffs)[odd]):+.3f}." if dict(diffs).get(odd) else "no data.")
                )
            lines.append("")
    # bytes and time
    lines += ["## Bytes and time", "", "| method | up per site and round (bytes) | down per site and round | "
              "run wall (s, mean) |", "|---|---|---|---|"]  # fmt: skip
    for method in methods:
        mrows = [r for r in rows if r["method"] == method]
        if not mrows:
            continue
        up = np.mean([r["train_bytes_up"] for r in mrows]) / args.rounds
        down = np.mean([r["train_bytes_down"] for r in mrows]) / args.rounds
        wall = np.mean([r["run_wall_s"] for r in mrows])
        lines.append(f"| {method} | {up:,.0f} | {down:,.0f} | {wall:.1f} |")
    lines += [
        "",
        "FedCRLD's messages hold only the shared encoder (`weights/encoder.*`); FedAvg and FedProx "
        "send the whole network; local training sends nothing.",
        "",
        "![per-site Dice](per_site_dice.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    plot(args, rows, out / "per_site_dice.png", sites, odd, methods)


def plot(
    args: argparse.Namespace, rows: list[dict], path: Path, sites: list[str], odd: str, methods: list[str]
) -> None:
    """Per-site Dice (mean and std over seeds) of every method, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.budgets), figsize=(5 * len(args.budgets), 4), sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.8 / len(methods)
    for ax, budget in zip(axes, args.budgets):
        for i, method in enumerate(methods):
            means, stds = [], []
            for site in sites:
                v = [
                    r["dice_mean"]
                    for r in rows
                    if r["method"] == method and r["budget"] == budget and r["site"] == site
                ]
                means.append(np.mean(v) if v else np.nan)
                stds.append(np.std(v) if v else 0.0)
            x = np.arange(len(sites)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, capsize=2, label=method)
        ax.set_xticks(np.arange(len(sites)), [f"{s}*" if s == odd else s for s in sites])
        ax.set_title(f"budget {budget}")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("test Dice (mean of RV, MYO, LV)")
    axes[-1].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Per-site Dice, mean ± std over seeds (* most different site: {odd})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(args.sequences) < 2 and not args.dataset:
        raise SystemExit("need at least 2 sites")
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = args.out.resolve()
    work = (args.work or out.parent / f".{out.name}-work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    splits, counts = prepare(args, work)
    sites = list(next(iter(splits.values())))
    profiles = site_profiles(splits[args.budgets[-1]], args.bundle)
    odd, gaps = most_different(profiles)
    print(f"most different site: {odd} {gaps}", flush=True)
    test_sets = {
        s: [{"image": e["image"], "label": e["label"]} for e in load_site_datalist(p)["test"]]
        for s, p in splits[args.budgets[0]].items()
    }
    scorers = {
        "plain": BundleScorer(test_sets, args.bundle),
        "fedcrld": BundleScorer(test_sets, network_overrides({"bundle": args.bundle})),
    }
    rows_file = work / "rows.jsonl"
    # the method list may grow between invocations: units are keyed by method
    ignored = ("out", "work", "deadline_min", "methods")
    ignored += () if args.dataset else ("dataset", "format", "site_key")
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ignored}, default=str))
    settings_file = work / "settings.json"
    if settings_file.is_file():
        before = {k: v for k, v in json.loads(settings_file.read_text()).items() if k not in ignored}
        if before != settings:
            raise SystemExit(f"{work} holds a run with other settings; remove it or pass another --work")
    settings_file.write_text(json.dumps(settings))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    done = {unit_key(r["method"], r["budget"], r["seed"]) for r in rows}
    missing = []
    for seed in args.seeds:
        for budget in args.budgets:
            for method in args.methods:
                key = unit_key(method, budget, seed)
                if key in done:
                    continue
                if args.deadline_min and time.perf_counter() - start > 60 * args.deadline_min:
                    missing.append(key)
                    continue
                t0 = time.perf_counter()
                unit_rows = run_unit(args, method, budget, counts[budget], seed, splits[budget], scorers)
                with rows_file.open("a") as f:
                    for row in unit_rows:
                        f.write(json.dumps(row) + "\n")
                rows += unit_rows
                dices = " ".join(f"{r['site']}={r['dice_mean']:.3f}" for r in unit_rows)
                print(f"{key}: {time.perf_counter() - t0:.0f} s {dices}", flush=True)
    command = "nice -n 15 python benchmarks/heterogeneous.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {
        "sites": sites,
        "profiles": profiles,
        "gaps": gaps,
        "most_different_site": odd,
        "counts": counts,
        "training_volumes": counts.get(ALL, max(counts.values())),
    }
    write_report(args, rows, out, meta, missing, command.strip())
    print(f"wrote {out}/results.json, report.md, per_site_dice.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
