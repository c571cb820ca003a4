"""Choose a method's pre-training settings on the validation patients (issue 10, SPEC §7).

Each variant is one ``fedcontrast bench`` run folder of random init and the method, differing
from the others only in ``pretrain_overrides`` (and in which seeds ran), run with
``--validation all`` so that every fine-tuned model is also scored on each site's validation
patients:

    fedcontrast bench --profile cpu --methods random_init fcl --budgets 1 --seeds 0 1 2 \\
        --readouts finetune --validation all --pretrain-overrides '{"lr": 3e-3}' --out workspace/sweep/lr3e-3

For every variant this reads the rows (``rows.jsonl``: the results file keeps only random
init's validation rows) and computes the method minus random init at the final checkpoint,
paired on seed, site and split (:mod:`fedcontrast.bench.stats`), per fine-tuning mode, on the
validation and on the test patients. **The choice reads validation rows only**: the variant
with the highest mean over the modes of its validation difference, on the seeds every variant
ran. Test differences are reported beside it, on all the seeds a variant ran (the chosen one
may have been given more seeds after the choice). Writes ``<out>.json`` and ``<out>.md``:

    python benchmarks/pretrain_sweep.py workspace/sweep/* --method fcl --n 1 \\
        --out benchmarks/results/pretrain_sweep
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from data_per_site import check_comparable

from fedcontrast.bench.environment import run_environment
from fedcontrast.bench.protocol import RANDOM_INIT
from fedcontrast.bench.report import format_difference, headline_rows, merge_runs, normalise_rows
from fedcontrast.bench.stats import paired_differences, summarise

#: Settings the variants may differ in.
FREE = ("pretrain_overrides", "seeds", "methods")


def check_variants(configs: dict[Path, dict[str, Any]], method: str) -> None:
    """Refuse folders that lack the method or random init, that were not scored on validation,
    or whose settings differ in more than :data:`FREE`; names the folder."""
    for path, config in configs.items():
        if not {RANDOM_INIT, method} <= set(config["methods"]):
            raise ValueError(f"{path}: the run holds {config['methods']}, not random init and {method}")
        if config.get("validation") != "all":
            raise ValueError(f"{path}: run without --validation all, so {method} has no validation rows")
    check_comparable({path: {"config": config} for path, config in configs.items()}, free=FREE)


def differences(
    rows: list[dict[str, Any]], method: str, n_labeled: int, split: str, seeds: set[int] | None, n_boot: int
) -> dict[str, dict[str, Any]]:
    """Fine-tuning mode -> summary of method minus random init (final checkpoint, full fine-tuning)."""
    final = [
        r
        for r in headline_rows(normalise_rows(rows), split)
        if r["n_labeled"] == n_labeled
        and r["readout"] == "finetune"
        and (seeds is None or r["seed"] in seeds)
    ]
    out = {}
    for mode in ("local", "federated"):
        pairs = paired_differences([r for r in final if r["finetune"] == mode], method)
        if pairs:
            out[mode] = summarise(pairs, n_boot=n_boot)
    return out


def label(overrides: dict[str, Any]) -> str:
    """A variant's name: its overrides as compact JSON (``defaults`` when there are none)."""
    return json.dumps(overrides, separators=(",", ":")) if overrides else "defaults"


def sweep(folders: list[Path], method: str, n_labeled: int, n_boot: int) -> dict[str, Any]:
    """Every variant's validation and test differences, and the choice (see the module docstring)."""
    loaded = {folder: merge_runs([folder])[:2] for folder in folders}
    check_variants({folder: config for folder, (config, _) in loaded.items()}, method)
    common = set.intersection(*(set(config["seeds"]) for config, _ in loaded.values()))
    variants = []
    for folder, (config, rows) in loaded.items():
        validation = differences(rows, method, n_labeled, "validation", common, n_boot)
        means = [cell["mean"] for cell in validation.values()]
        variants.append(
            {
                "variant": label(config["pretrain_overrides"]),
                "folder": str(folder),
                "pretrain_overrides": config["pretrain_overrides"],
                "validation": validation,
                "score": sum(means) / len(means) if means else float("nan"),
                "test": differences(rows, method, n_labeled, "test", None, n_boot),
                "environment": run_environment([folder]),
            }
        )
    chosen = max((v for v in variants if v["score"] == v["score"]), key=lambda v: v["score"])
    return {
        "method": method,
        "n_labeled": n_labeled,
        "choice_seeds": sorted(common),
        "variants": variants,
        "chosen": chosen["variant"],
    }


def markdown(result: dict[str, Any], command: str) -> str:
    """The sweep as a markdown page: the command, the rule, one row per variant."""
    method, n = result["method"], result["n_labeled"]
    lines = [
        f"# {method}'s pre-training settings, chosen on validation (N = {n})\n",
        f"Written by `{command}`.\n",
        f"{method} minus random init at N = {n}, full fine-tuning, final checkpoint, paired on seed, site "
        "and split; 95% bootstrap interval over the (seed, site) pairs. The choice is the highest mean "
        f"over local and federated fine-tuning of the **validation** difference, on seeds "
        f"{result['choice_seeds']} (every variant's); the test columns were not read for it.\n",
        f"**Chosen: `{result['chosen']}`.**\n",
        "| variant | validation, local | validation, federated | score | test, local | test, federated |",
        "|---|---|---|---|---|---|",
    ]
    for v in sorted(result["variants"], key=lambda v: -v["score"]):
        cells = [
            format_difference(v[split].get(mode))
            for split in ("validation",)
            for mode in ("local", "federated")
        ]
        tests = [
            f"{format_difference(v['test'].get(mode))} ({v['test'][mode]['n_seeds']} seeds)"
            if mode in v["test"]
            else "—"
            for mode in ("local", "federated")
        ]
        lines.append(
            f"| `{v['variant']}` | {cells[0]} | {cells[1]} | {v['score']:+.3f} | {tests[0]} | {tests[1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="bench run folders, one per variant")
    parser.add_argument("--method", default="fcl")
    parser.add_argument("--n", type=int, default=1, help="label budget compared")
    parser.add_argument("--n-boot", type=int, default=10_000)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    result = sweep(args.runs, args.method, args.n, args.n_boot)
    command = "python benchmarks/pretrain_sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(f"chosen: {result['chosen']} ({args.out.with_suffix('.md')})")


if __name__ == "__main__":
    main()
