"""The published comparison protocol (SPEC §7), resumable.

Work is split into units:

- a **pre-training unit** ``(method, seed)`` runs the method's real protocol in process
  (:func:`~fedcontrast.methods.runner.run_in_process`: the same trainer and strategy calls,
  and the same :func:`~fedcontrast.methods.base.count_bytes` on the same messages, as the
  NVFlare controller) and saves its encoder(s) and its per-round bytes;
- a **fine-tuning unit** ``(method, seed, mode, N)`` fine-tunes from that encoder with the
  ``supervised`` method (the bundle's own train workflow) on N labelled volumes per site,
  federated (FedAvg, one global model) or local (each site alone), then scores every site's
  held-out test set with :class:`~fedcontrast.bench.evaluate.BundleScorer`.

``random_init`` is fine-tuning without an encoder. Federated methods yield one global encoder;
``local_cl`` yields one per site: local fine-tuning starts each site from its own, federated
fine-tuning from their average. Each unit runs in a fresh worker process, so the peak
resident memory it reports (sites run one after another) is its own. Every finished unit
is appended to ``rows.jsonl`` (and its pre-training record to ``pretrain/``), so an
interrupted run continues where it stopped.
The data split is fixed (its seed is ``data_seed``); run seeds change the training only.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcontrast.methods.base import KINDS, message_to_state_dict, select
from fedcontrast.methods.registry import available_methods, get_method
from fedcontrast.methods.runner import run_in_process

logger = logging.getLogger(__name__)

RANDOM_INIT = "random_init"
MODES = ("local", "federated")


@dataclass
class BenchConfig:
    """Everything that changes the numbers (written into every result file)."""

    methods: list[str] = field(default_factory=lambda: [RANDOM_INIT, *available_methods(pretraining=True)])
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sites: int = 4
    patients_per_site: int = 6
    test_per_site: int = 1
    data_seed: int = 0
    size: str = "small"
    pretrain_rounds: int = 2
    pretrain_epochs: int = 1
    finetune_rounds: int = 2
    finetune_epochs: int = 5
    batch_size: int = 4
    network: dict[str, Any] = field(
        default_factory=lambda: {
            "init_filters": 8,
            "blocks_down": [1, 2, 2],
            "inplane_spacing": 3.0,
            "roi_size": [48, 48],
            "patch_size": [48, 48, 8],
        }
    )
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)

    def pretrain_config(self, seed: int) -> dict[str, Any]:
        """The pre-training methods' configuration for ``seed``."""
        return {
            "bundle": self.network,
            "seed": seed,
            "local_epochs": self.pretrain_epochs,
            "batch_size": self.batch_size,
            **self.pretrain_overrides,
        }

    def finetune_config(self, seed: int, encoder: str) -> dict[str, Any]:
        """The ``supervised`` configuration for ``seed``, starting from ``encoder`` ("" for none)."""
        return {
            "bundle": self.network,
            "pretrained_encoder": encoder,
            "local_epochs": self.finetune_epochs,
            "seed": seed,
            "num_workers": 0,
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _site_bytes(history: list[dict[str, Any]], site: str) -> dict[str, Any]:
    """Sum of one site's per-round bytes, by kind and direction, in the RESULTS_FORMAT keys."""
    by_kind = {f"{k}_{d}": 0 for k in ("weights", "target", "features") for d in ("up", "down")}
    up = down = 0
    for record in history:
        if record["site"] != site:
            continue
        for kind in KINDS:
            up += record["bytes_up"].get(kind, 0)
            down += record["bytes_down"].get(kind, 0)
            if kind != "stats":
                by_kind[f"{kind}_up"] += record["bytes_up"].get(kind, 0)
                by_kind[f"{kind}_down"] += record["bytes_down"].get(kind, 0)
    return {"pretrain_bytes_up": up, "pretrain_bytes_down": down, "bytes_by_kind": by_kind}


def pretrain_unit(config: BenchConfig, method: str, seed: int, datalists: dict, out: Path) -> dict[str, Any]:
    """Run one pre-training; save its encoder(s) under ``out``; return its record (bytes, wall, rounds)."""
    from fedcontrast.methods.volumes import pretraining_entries

    torch.set_num_threads(1)
    entries = {site: pretraining_entries(d) for site, d in datalists.items()}
    result = run_in_process(method, config.pretrain_config(seed), entries, config.pretrain_rounds)
    out.mkdir(parents=True, exist_ok=True)
    if get_method(method).federated:
        weights = select(result.global_message, "weights")
        encoder = {
            k[len("encoder.") :]: torch.as_tensor(v) for k, v in weights.items() if k.startswith("encoder.")
        }
        torch.save(encoder, out / "global.pt")
    else:
        for site, state in result.encoders.items():
            torch.save(state, out / f"{site}.pt")
        stacked = {k: torch.stack([s[k].float() for s in result.encoders.values()]) for k in state}
        average = {k: v.mean(0).to(state[k].dtype) for k, v in stacked.items()}
        torch.save(average, out / "global.pt")
    record = {
        "method": method,
        "seed": seed,
        "wall_s": result.wall_s,
        "sites": {site: _site_bytes(result.history, site) for site in datalists},
        "per_round": [
            {"round": r["round"], "site": r["site"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]}
            for r in result.history
        ],
        "server_metrics": result.server_metrics,
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return record


@dataclass(frozen=True)
class FinetuneUnit:
    """One fine-tuning unit (see the module docstring)."""

    method: str
    seed: int
    mode: str
    n_labeled: int

    @property
    def key(self) -> str:
        return f"{self.method}|{self.seed}|{self.mode}|{self.n_labeled}"


def finetune_unit(
    config: BenchConfig,
    unit: FinetuneUnit,
    splits: dict[str, dict],
    encoders: Path | None,
    record: dict | None,
    examples_dir: Path,
) -> list[dict[str, Any]]:
    """Fine-tune and score one unit; returns one row per site (RESULTS_FORMAT keys, plus ``unit``).

    The first seed at the smallest budget also saves an example (image, truth, prediction) of
    the first site's first test volume to ``examples_dir/<method>_<mode>.npz``.
    """
    from fedcontrast.bench.evaluate import BundleScorer

    torch.set_num_threads(1)
    scorer = BundleScorer({site: s["test"] for site, s in splits.items()}, config.network)
    training = {site: s["training"] for site, s in splits.items()}
    models: dict[str, dict[str, torch.Tensor]] = {}
    start = time.perf_counter()
    if unit.mode == "federated":
        encoder = str(encoders / "global.pt") if encoders else ""
        result = run_in_process(
            "supervised", config.finetune_config(unit.seed, encoder), training, config.finetune_rounds
        )
        models = dict.fromkeys(training, message_to_state_dict(result.global_message))
    else:
        for site, entries in training.items():
            own = encoders / f"{site}.pt" if encoders else None
            encoder = str(own if own and own.exists() else encoders / "global.pt") if encoders else ""
            cfg = config.finetune_config(unit.seed, encoder)
            result = run_in_process(
                "supervised", cfg, {site: entries}, config.finetune_rounds, federated=False
            )
            models[site] = message_to_state_dict(result.final_messages[site])
    wall = time.perf_counter() - start
    rows = []
    for site, state in models.items():
        scores = scorer.score(state, site)
        bytes_ = record["sites"][site] if record else _site_bytes([], site)
        rows.append(
            {
                "unit": unit.key,
                "method": unit.method,
                "finetune": unit.mode,
                "n_labeled": unit.n_labeled,
                "seed": unit.seed,
                "site": site,
                **scores,
                **bytes_,
                "pretrain_wall_s": record["wall_s"] if record else 0.0,
                "finetune_wall_s": wall,
                "peak_rss_mb": max(peak_rss_mb(), record["peak_rss_mb"] if record else 0.0),
            }
        )
    if unit.seed == config.seeds[0] and unit.n_labeled == min(config.budgets):
        site = sorted(models)[0]
        examples_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            examples_dir / f"{unit.method}_{unit.mode}.npz", **scorer.example(models[site], site)
        )
    return rows


def prepare_splits(
    config: BenchConfig, out: Path, dataset: Path | None = None, fmt: str = "acdc"
) -> dict[int, dict[str, dict]]:
    """Per-budget site splits ``{N: {site: site datalist}}`` (the phantom unless ``dataset`` is given).

    One split seed for every budget: the test sets are the same and the labelled sets nested.
    """
    from fedcontrast.data.datalist import load_site_datalist
    from fedcontrast.data.phantom import synthesize_dataset
    from fedcontrast.data.readers import read_dataset
    from fedcontrast.data.splits import write_site_splits

    if dataset is None:
        dataset = out / "data"
        if not (dataset / "phantom.json").exists():
            synthesize_dataset(dataset, config.sites, config.patients_per_site, config.data_seed, config.size)
    entries, labels = read_dataset(dataset, fmt, cache_dir=out / "frames")
    splits = {}
    for n in config.budgets:
        folder = out / "splits" / f"N{n}"
        write_site_splits(
            entries,
            labels,
            folder,
            n,
            config.test_per_site,
            seed=config.data_seed,
            sites=None if dataset == out / "data" else config.sites,
        )
        splits[n] = {p.stem: load_site_datalist(p) for p in sorted(folder.glob("site-*.json"))}
    return splits


def completed_units(rows_file: Path) -> set[str]:
    """Keys of the fine-tuning units already in ``rows_file``."""
    if not rows_file.exists():
        return set()
    return {json.loads(line)["unit"] for line in rows_file.read_text().splitlines() if line.strip()}


def finetune_units(config: BenchConfig) -> list[FinetuneUnit]:
    """Every fine-tuning unit, smallest budgets first (so partial runs hold complete low-N tables)."""
    return [
        FinetuneUnit(m, seed, mode, n)
        for n in sorted(config.budgets)
        for seed in config.seeds
        for m in config.methods
        for mode in MODES
    ]


def check_resumable(config: BenchConfig, out: Path) -> None:
    """Refuse to continue a run folder whose configuration differs from ``config``.

    Raises:
        ValueError: ``out`` holds rows of another configuration; the message names what differs.
    """
    saved = out / "bench_config.json"
    if not saved.exists():
        return
    previous, current = json.loads(saved.read_text()), json.loads(json.dumps(asdict(config)))
    changed = sorted(k for k in current if previous.get(k) != current[k])
    if changed:
        raise ValueError(
            f"{out} holds a run with other settings ({', '.join(changed)}); "
            "resume it with the same options or choose another --out"
        )


def run_benchmark(
    config: BenchConfig, out: Path, workers: int = 2, dataset: Path | None = None, fmt: str = "acdc"
) -> list[dict[str, Any]]:
    """Run (or resume) every unit; returns all rows. Progress goes to the log."""
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(config, out)
    (out / "bench_config.json").write_text(json.dumps(asdict(config), indent=1))
    splits = prepare_splits(config, out, dataset, fmt)
    pretraining = [(m, s) for m in config.methods if m != RANDOM_INIT for s in config.seeds]
    todo = [(m, s) for m, s in pretraining if not (out / "pretrain" / f"{m}_s{s}" / "record.json").exists()]
    first = splits[min(config.budgets)]
    context = get_context("spawn")
    # one fresh process per unit: its peak RSS is that unit's alone
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(pretrain_unit, config, m, s, first, out / "pretrain" / f"{m}_s{s}"): (m, s)
            for m, s in todo
        }
        _drain(futures, "pre-training", lambda _: None)
        done = completed_units(out / "rows.jsonl")
        units = [u for u in finetune_units(config) if u.key not in done]
        futures = {}
        for unit in units:
            folder = out / "pretrain" / f"{unit.method}_s{unit.seed}"
            record = json.loads((folder / "record.json").read_text()) if unit.method != RANDOM_INIT else None
            encoders = folder if unit.method != RANDOM_INIT else None
            args = (config, unit, splits[unit.n_labeled], encoders, record, out / "examples")
            futures[pool.submit(finetune_unit, *args)] = unit.key

        def append(rows: list[dict[str, Any]]) -> None:
            with open(out / "rows.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

        _drain(futures, "fine-tuning", append)
    return load_rows(out / "rows.jsonl")


def _drain(futures: dict, what: str, on_result) -> None:
    """Wait for ``futures``, passing each result to ``on_result`` and logging progress."""
    total = len(futures)
    start = time.perf_counter()
    for i, future in enumerate(as_completed(futures), 1):
        on_result(future.result())
        logger.info(
            "%s %d/%d done (%s) after %.0f s", what, i, total, futures[future], time.perf_counter() - start
        )


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``rows.jsonl`` file."""
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def pretrain_records(out: Path, methods: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Saved pre-training records by method."""
    return {
        m: [json.loads(p.read_text()) for p in sorted((out / "pretrain").glob(f"{m}_s*/record.json"))]
        for m in methods
    }
