"""Choose a column's fine-tuning recipe on the validation patients, and report its test score (issue 10).

Each recipe is one pair of :mod:`column_difference` outputs, ``PREFIX_validation.json`` and
``PREFIX.json`` (test): the column fine-tuned with that recipe minus random init fine-tuned with
*its* recipe (random init's best on validation), on the same (seed, site) pairs. Per fine-tuning
mode the choice is the recipe with the highest mean validation difference; **no test row is
read for it**. Its test difference is reported beside every recipe's:

    python benchmarks/choose_recipe.py "1=enc/fedmotion_s1" "0.3=enc/fedmotion_s03" \\
        "0.1=enc/fedmotion_s01" --setting finetune_encoder_lr_scale --out enc/choice_fedmotion

Writes ``<out>.json`` and ``<out>.md``. Refuses recipes whose outputs lack a mode another has.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from fedcontrast.bench.report import format_difference, output_file

SPLITS = {"validation": "_validation.json", "test": ".json"}


def load_recipe(prefix: str, readout: str = "finetune") -> dict[str, dict[str, dict[str, Any]]]:
    """``{split: {mode: cell}}`` of one recipe's :mod:`column_difference` outputs, ``readout`` cells only.

    Raises:
        FileNotFoundError: a split's output is missing (its path named).
    """
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for split, suffix in SPLITS.items():
        path = Path(prefix + suffix)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no column_difference output for the {split} split")
        document = json.loads(path.read_text())
        cells[split] = {c["finetune"]: c for c in document["cells"] if c["readout"] == readout}
    return cells


def choose(recipes: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, str]:
    """Per mode, the recipe label with the highest mean validation difference (the first on a tie).

    Raises:
        ValueError: a recipe lacks a mode's validation cell that another recipe has.
    """
    modes = sorted({m for cells in recipes.values() for m in cells["validation"]})
    for label, cells in recipes.items():
        missing = [m for m in modes if m not in cells["validation"]]
        if missing:
            raise ValueError(f"recipe {label!r} has no validation pairs for {missing}")
    return {
        mode: max(recipes, key=lambda label: recipes[label]["validation"][mode]["mean"]) for mode in modes
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="+", help="LABEL=PREFIX of column_difference outputs")
    parser.add_argument("--setting", required=True, help="what the labels are values of (for the table)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    recipes = {}
    for spec in args.recipes:
        label, sep, prefix = spec.partition("=")
        if not sep or not label or not prefix:
            raise ValueError(f"{spec!r}: expected LABEL=PREFIX")
        recipes[label] = load_recipe(prefix)
    chosen = choose(recipes)
    document = {
        "benchmark": "choose_recipe",
        "command": "python " + shlex.join(sys.argv),
        "setting": args.setting,
        "rule": "per mode, the highest mean validation difference; test read only to report",
        "chosen": chosen,
        "recipes": recipes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(document, indent=1))
    lines = [
        f"# `{args.setting}` chosen on validation, per fine-tuning mode\n",
        f"Written by `{document['command']}`. Each cell: the column minus random init at its own best "
        "recipe, paired on (seed, site), 95% bootstrap interval. The choice (bold) reads the validation "
        "column only.\n",
        f"| mode | `{args.setting}` | validation | test |",
        "|---|---|---|---|",
    ]
    for mode, best in chosen.items():
        for label, cells in recipes.items():
            mark = "**" if label == best else ""
            validation = format_difference(cells["validation"][mode])
            test = format_difference(cells["test"].get(mode))
            lines.append(f"| {mode} | {mark}{label}{mark} | {mark}{validation}{mark} | {test} |")
    output_file(args.out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
