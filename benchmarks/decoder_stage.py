"""Does local contrastive decoder pre-training help? Encoder-only against encoder + decoder, paired.

For each encoder pre-training method and seed this runs, with the benchmark's own units
(:mod:`fedcontrast.bench.protocol`, not edited): the pre-training unit, then the decoder stage
(:func:`fedcontrast.methods.local_decoder.pretrain_decoder`, as many rounds as pre-training;
federated on the global encoder, and per site on each site's own encoder where the method has
per-site encoders), then the same fine-tuning units from the encoder alone (``<method>``) and
from the decoder checkpoint (``<method>+decoder``), plus ``random_init``. Same data, seeds,
fine-tuning steps and scorer for every column; rows are appended to ``OUT/rows.jsonl`` and
the run resumes where it stopped.

    python benchmarks/decoder_stage.py --out workspace/bench-decoder [--methods local_cl fcl]
        [--seeds 0 1] [--budgets 1 2] [--sites 4] [--report benchmarks/results/decoder_stage.json]

``--summary-only`` writes the report of the rows so far (what is missing is listed).
The report holds, per fine-tuning mode and N, the mean Dice of every column and the paired
differences (``<method>+decoder`` minus ``<method>``, and each minus ``random_init``) over
seeds x sites, with their std.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from fedcontrast.bench.protocol import (
    MODES,
    RANDOM_INIT,
    BenchConfig,
    FinetuneUnit,
    completed_units,
    finetune_unit,
    load_rows,
    prepare_splits,
    pretrain_unit,
)
from fedcontrast.methods.local_decoder import DECODER_FILE, pretrain_decoder
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.volumes import pretraining_entries

SUFFIX = "+decoder"


@dataclass
class DecoderBenchConfig(BenchConfig):
    """A :class:`BenchConfig` whose fine-tuning swaps an encoder file for its decoder checkpoint.

    Attributes:
        decoders: encoder file -> decoder-stage checkpoint; fine-tuning from a mapped encoder
            loads the checkpoint (its encoder and decoder blocks) instead.
    """

    decoders: dict[str, str] = field(default_factory=dict)

    def finetune_config(self, seed: int, encoder: str, readout: str = "finetune") -> dict[str, Any]:
        config = super().finetune_config(seed, encoder, readout)
        if encoder in self.decoders:
            config.update(pretrained_encoder="", pretrained_decoder=self.decoders[encoder])
        return config


def decoder_stage(config: BenchConfig, method: str, seed: int, splits: dict, folder: Path) -> dict[str, str]:
    """Run the decoder stage on ``folder``'s encoders; returns encoder file -> checkpoint file."""
    entries = {site: pretraining_entries(d) for site, d in splits.items()}
    cfg = config.pretrain_config(seed)
    mapping = {}
    fed = folder / "decoder" / DECODER_FILE
    if not fed.exists():
        pretrain_decoder(folder / "global.pt", cfg, entries, config.pretrain_rounds, True, folder / "decoder")
    mapping[str(folder / "global.pt")] = str(fed)
    if not get_method(method).federated:  # per-site encoders: a per-site decoder stage for each
        for site in entries:
            own = folder / "decoder" / site / DECODER_FILE
            if not own.exists():
                pretrain_decoder(
                    {site: folder / f"{site}.pt"}, cfg, {site: entries[site]}, config.pretrain_rounds, False,
                    folder / "decoder",
                )  # fmt: skip
            mapping[str(folder / f"{site}.pt")] = str(own)
    return mapping


def summarise(rows: list[dict[str, Any]], methods: list[str], config: BenchConfig) -> dict[str, Any]:
    """Mean Dice per column and paired differences, per mode and N (pairs: same seed and site)."""
    # full fine-tuning scored on test at its last checkpoint (rows of older protocols lack these keys)
    last: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("readout", "finetune") != "finetune" or r.get("eval_split", "test") != "test":
            continue
        key = (r["method"], r["finetune"], r["n_labeled"], r["seed"], r["site"])
        if key not in last or r.get("finetune_steps", 0) >= last[key].get("finetune_steps", 0):
            last[key] = r
    by = {key: r["dice_mean"] for key, r in last.items()}
    out: dict[str, Any] = {}
    for mode in MODES:
        for n in config.budgets:
            cell: dict[str, Any] = {}
            columns = [RANDOM_INIT] + [c for m in methods for c in (m, m + SUFFIX)]
            for column in columns:
                values = [v for (m, f, nn, _, _), v in by.items() if (m, f, nn) == (column, mode, n)]
                if values:
                    cell[column] = {"dice": mean(values), "count": len(values)}
            pairs = [(f"{m}{SUFFIX}", m) for m in methods] + [(c, RANDOM_INIT) for c in columns[1:]]
            for a, b in pairs:
                diffs = [
                    by[(a, mode, n, s, site)] - by[(b, mode, n, s, site)]
                    for (m, f, nn, s, site) in by
                    if (m, f, nn) == (a, mode, n) and (b, mode, n, s, site) in by
                ]
                if diffs:
                    cell[f"{a} - {b}"] = {"mean": mean(diffs), "std": pstdev(diffs), "pairs": len(diffs)}
            out[f"{mode} N={n}"] = cell
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("workspace/bench-decoder"))
    parser.add_argument("--methods", nargs="+", default=["local_cl", "fcl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients-per-site", type=int, default=6)
    parser.add_argument("--report", type=Path, help="JSON summary (default OUT/summary.json)")
    parser.add_argument(
        "--summary-only", action="store_true", help="write the summary of the rows so far, run nothing"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = BenchConfig(
        methods=[RANDOM_INIT, *args.methods],
        budgets=args.budgets,
        seeds=args.seeds,
        sites=args.sites,
        patients_per_site=args.patients_per_site,
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        run_units(base, args.methods, out)
    rows = load_rows(out / "rows.jsonl")
    columns = [RANDOM_INIT] + [c for m in args.methods for c in (m, m + SUFFIX)]
    expected = {
        FinetuneUnit(c, s, mode, n).key
        for c in columns
        for s in base.seeds
        for mode in MODES
        for n in base.budgets
    }
    summary = {
        "command": "python benchmarks/decoder_stage.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v not in (None, False) and k not in ("report", "summary_only")
        ),
        "config": dict(base.__dict__),
        "decoder_stage": "local_decoder defaults (L^R, grid 4, window 3, decoder_levels: all but the last)",
        "units_done": len({r["unit"] for r in rows} & expected),
        "units_missing": sorted(expected - {r["unit"] for r in rows}),
        "results": summarise(rows, args.methods, base),
    }  # fmt: skip
    report = args.report or out / "summary.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=1, default=str))
    print(report)


def run_units(base: BenchConfig, methods: list[str], out: Path) -> None:
    """Pre-training, decoder stage and fine-tuning units not yet done (rows to ``out/rows.jsonl``)."""
    splits = prepare_splits(base, out)
    first = splits[min(base.budgets)]
    decoders: dict[str, str] = {}
    start = time.perf_counter()
    for method in methods:
        for seed in base.seeds:
            folder = out / "pretrain" / f"{method}_s{seed}"
            if not (folder / "record.json").exists():
                pretrain_unit(base, method, seed, first, folder)
            decoders.update(decoder_stage(base, method, seed, first, folder))
    config = DecoderBenchConfig(**{**base.__dict__, "decoders": decoders})
    rows_file = out / "rows.jsonl"
    done = completed_units(rows_file)  # drops a torn last line before appending
    for n in sorted(config.budgets):
        for seed in config.seeds:
            for column in [RANDOM_INIT] + [c for m in methods for c in (m, m + SUFFIX)]:
                for mode in MODES:
                    unit = FinetuneUnit(column, seed, mode, n)
                    if unit.key in done:
                        continue
                    method = column.removesuffix(SUFFIX)
                    folder = out / "pretrain" / f"{method}_s{seed}" if column != RANDOM_INIT else None
                    record = json.loads((folder / "record.json").read_text()) if folder else None
                    # the decoder columns differ only in the config's encoder -> checkpoint mapping
                    cfg = config if column.endswith(SUFFIX) else base
                    rows = finetune_unit(cfg, unit, splits[n], folder, record, out / "examples")
                    with open(rows_file, "a") as f:
                        f.writelines(json.dumps(row) + "\n" for row in rows)
                    logging.info("%s done after %.0f s", unit.key, time.perf_counter() - start)


if __name__ == "__main__":
    main()
