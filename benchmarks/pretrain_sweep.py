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
may have been given more seeds after the choice). Runs made with ``--readouts finetune probe``
also get the frozen-encoder probe's differences (validation and test) reported beside the
choice; the choice does not read them. Writes ``<out>.json`` and ``<out>.md``:

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
from fedcontrast.bench.report import format_difference, headline_rows, merge_runs, normalise_rows, output_file
from fedcontrast.bench.stats import paired_differences, summarise

#: Settings the variants may differ in (``cine`` changes only ``supervised_motion``'s targets).
FREE = ("pretrain_overrides", "seeds", "methods", "cine")


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
    rows: list[dict[str, Any]],
    method: str,
    n_labeled: int,
    split: str,
    seeds: set[int] | None,
    n_boot: int,
    readout: str = "finetune",
) -> dict[str, dict[str, Any]]:
    """Fine-tuning mode -> summary of method minus random init at the final checkpoint, for one
    readout (full fine-tuning or the frozen-encoder probe); modes without rows are left out."""
    final = [
        r
        for r in headline_rows(normalise_rows(rows), split)
        if r["n_labeled"] == n_labeled and r["readout"] == readout and (seeds is None or r["seed"] in seeds)
    ]
    out = {}
    for mode in ("local", "federated"):
        pairs = paired_differences([r for r in final if r["finetune"] == mode], method)
        if pairs:
            out[mode] = summarise(pairs, n_boot=n_boot)
    return out


def label(config: dict[str, Any]) -> str:
    """A variant's name: its overrides as compact JSON, and ``cine`` when its phantom had cine
    series (``defaults`` when neither)."""
    parts = (
        [json.dumps(config["pretrain_overrides"], separators=(",", ":"))]
        if config["pretrain_overrides"]
        else []
    )
    return " + ".join([*parts, *(["cine"] if config.get("cine") else [])]) or "defaults"


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
                "variant": label(config),
                "folder": str(folder),
                "pretrain_overrides": config["pretrain_overrides"],
                "validation": validation,
                "score": sum(means) / len(means) if means else float("nan"),
                "test": differences(rows, method, n_labeled, "test", None, n_boot),
                "probe": {
                    split: differences(rows, method, n_labeled, split, seeds, n_boot, readout="probe")
                    for split, seeds in (("validation", common), ("test", None))
                },
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


def probe_modes(result: dict[str, Any]) -> list[str]:
    """The fine-tuning modes any variant has frozen-encoder probe rows for."""
    return sorted({mode for v in result["variants"] for cells in v["probe"].values() for mode in cells})


def with_seeds(cells: dict[str, dict[str, Any]], mode: str) -> str:
    """A test cell: the difference and how many seeds it pools, or a dash where it is missing."""
    if mode not in cells:
        return "—"
    return f"{format_difference(cells[mode])} ({cells[mode]['n_seeds']} seeds)"


def markdown(result: dict[str, Any], command: str) -> str:
    """The sweep as a markdown page: the command, the rule, one row per variant (the probe's
    columns, where the runs have them, are reported beside the rule, not read by it)."""
    method, n = result["method"], result["n_labeled"]
    probes = probe_modes(result)
    header = ["variant", "validation, local", "validation, federated", "score"]
    header += ["test, local", "test, federated"]
    header += [f"probe ({mode}), {split}" for mode in probes for split in ("validation", "test")]
    lines = [
        f"# {method}'s pre-training settings, chosen on validation (N = {n})\n",
        f"Written by `{command}`.\n",
        f"{method} minus random init at N = {n}, final checkpoint, paired on seed, site "
        "and split; 95% bootstrap interval over the (seed, site) pairs. The choice is the highest mean "
        f"over local and federated full fine-tuning of the **validation** difference, on seeds "
        f"{result['choice_seeds']} (every variant's); the test and probe columns were not read for it.\n",
        f"**Chosen: `{result['chosen']}`.**\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for v in sorted(result["variants"], key=lambda v: -v["score"]):
        cells = [f"`{v['variant']}`"]
        cells += [format_difference(v["validation"].get(mode)) for mode in ("local", "federated")]
        cells += [f"{v['score']:+.3f}"] + [with_seeds(v["test"], mode) for mode in ("local", "federated")]
        for mode in probes:
            probe = v["probe"]
            cells += [format_difference(probe["validation"].get(mode)), with_seeds(probe["test"], mode)]
        lines.append("| " + " | ".join(cells) + " |")
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
    output_file(args.out, ".json").write_text(json.dumps({"command": command, **result}, indent=1) + "\n")
    output_file(args.out, ".md").write_text(markdown(result, command))
    print(f"chosen: {result['chosen']} ({output_file(args.out, '.md')})")


if __name__ == "__main__":
    main()
