"""Paired differences against random init and their bootstrap confidence intervals (SPEC §7).

A method's score is compared with random init's score on the *same* cell and replicate:
rows are matched on :data:`PAIR_KEYS` (seed, site, fine-tuning mode, label budget, readout,
fine-tuning steps, evaluation split), so both models saw the same split, the same seed and
the same decoder initialisation. The spread that matters is the one across these (seed,
site) pairs; the confidence interval is a percentile bootstrap over them, and the std across
seeds is reported beside it (seed variance is what the old report hid).

Plain numpy, no torch: the functions take rows (dicts in the results format) and return
numbers or plain dicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

#: What a method's row and its random-init partner must share.
PAIR_KEYS: tuple[str, ...] = (
    "seed",
    "site",
    "finetune",
    "n_labeled",
    "readout",
    "finetune_steps",
    "eval_split",
)
#: Default number of bootstrap resamples and the generator seed (fixed: reports are reproducible).
N_BOOT = 10_000
BOOT_SEED = 0


def _finite(value: Any) -> bool:
    return value is not None and bool(np.isfinite(value))


def paired_differences(
    rows: Iterable[dict[str, Any]],
    method: str,
    baseline: str = "random_init",
    value: Callable[[dict[str, Any]], float | None] = lambda r: r["dice_mean"],
) -> list[dict[str, Any]]:
    """``method`` minus ``baseline`` for every replicate both have.

    Args:
        rows: result rows holding every key of :data:`PAIR_KEYS` and ``method``.
        method: the method whose rows are compared.
        baseline: the reference method (random init).
        value: the score of a row (default ``dice_mean``); ``None`` or non-finite scores are
            left out of the pairs.

    Returns:
        One dict per matched replicate, sorted by its keys: the :data:`PAIR_KEYS` values plus
        ``"method_value"``, ``"baseline_value"`` and ``"difference"`` (method minus baseline).
        Replicates present for only one of the two methods are not paired.

    Raises:
        ValueError: two rows of the same method share every pair key (the rows are
            ambiguous, e.g. two run folders holding the same method); names the key.
    """
    by_key: dict[str, dict[tuple, float | None]] = {method: {}, baseline: {}}
    for row in rows:
        if row["method"] not in by_key:
            continue
        key = tuple(row[k] for k in PAIR_KEYS)
        if key in by_key[row["method"]]:
            raise ValueError(
                f"two rows of {row['method']} share {dict(zip(PAIR_KEYS, key))}; cannot pair them"
            )
        by_key[row["method"]][key] = value(row)
    pairs = []
    for key in sorted(set(by_key[method]) & set(by_key[baseline]), key=repr):
        ours, theirs = by_key[method][key], by_key[baseline][key]
        if _finite(ours) and _finite(theirs):
            pairs.append(
                {
                    **dict(zip(PAIR_KEYS, key)),
                    "method_value": float(ours),
                    "baseline_value": float(theirs),
                    "difference": float(ours) - float(theirs),
                }
            )
    return pairs


def bootstrap_ci(
    values: Sequence[float],
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = BOOT_SEED,
    groups: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement).

    Args:
        values: one number per replicate (here: per (seed, site) pair), shape ``(n,)``.
        n_boot: number of resamples.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        seed: seed of the resampling generator; the same inputs give the same interval.
        groups: optional label per value (e.g. its run seed): whole groups are resampled and
            a resample's mean is over all values of the drawn groups (a cluster bootstrap,
            for values that share something, such as the sites of one pre-trained encoder).

    Returns:
        ``(low, high)``; both equal the single value when all values are equal.

    Raises:
        ValueError: ``values`` is empty or holds a non-finite number, ``groups`` has another
            length, or ``level``/``n_boot`` are out of range.
    """
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0 or not np.isfinite(data).all():
        raise ValueError(f"bootstrap needs a non-empty 1-D array of finite values, got {values!r}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be positive, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    else:
        if len(groups) != data.size:
            raise ValueError(f"{len(groups)} group labels for {data.size} values")
        labels = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        index = np.array([labels[g] for g in groups])
        sums, sizes = np.bincount(index, weights=data), np.bincount(index).astype(float)
        drawn = rng.integers(0, len(labels), size=(n_boot, len(labels)))
        means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def seed_means(pairs: Iterable[dict[str, Any]], key: str = "difference") -> dict[Any, float]:
    """seed -> mean of ``pair[key]`` over that seed's sites (the per-seed site-averaged value)."""
    per_seed: dict[Any, list[float]] = defaultdict(list)
    for pair in pairs:
        per_seed[pair["seed"]].append(pair[key])
    return {seed: float(np.mean(v)) for seed, v in sorted(per_seed.items())}


def std_across_seeds(pairs: Iterable[dict[str, Any]], key: str = "difference") -> float:
    """Sample std (ddof 1) across seeds of the per-seed site-averaged ``key``; NaN for one seed."""
    means = list(seed_means(pairs, key).values())
    return float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")


def summarise(
    pairs: Sequence[dict[str, Any]],
    key: str = "difference",
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """Mean, bootstrap interval and seed spread of ``pair[key]`` over ``pairs``.

    Returns:
        ``{"mean", "ci_low", "ci_high", "seed_ci_low", "seed_ci_high", "std_seeds", "n_pairs",
        "n_seeds", "n_sites"}``: ``ci_*`` resamples the (seed, site) pairs, ``seed_ci_*`` whole
        seeds (:func:`bootstrap_ci` with ``groups``); with no pairs the numbers are NaN and the
        counts 0.
    """
    values = [p[key] for p in pairs]
    if not values:
        nan = float("nan")
        return dict(
            mean=nan,
            ci_low=nan,
            ci_high=nan,
            seed_ci_low=nan,
            seed_ci_high=nan,
            std_seeds=nan,
            n_pairs=0,
            n_seeds=0,
            n_sites=0,
        )
    low, high = bootstrap_ci(values, n_boot, level, seed)
    seed_low, seed_high = bootstrap_ci(values, n_boot, level, seed, groups=[p["seed"] for p in pairs])
    return {
        "mean": float(np.mean(values)),
        "ci_low": low,
        "ci_high": high,
        "seed_ci_low": seed_low,
        "seed_ci_high": seed_high,
        "std_seeds": std_across_seeds(pairs, key),
        "n_pairs": len(values),
        "n_seeds": len({p["seed"] for p in pairs}),
        "n_sites": len({p["site"] for p in pairs}),
    }


def values_summary(
    rows: Iterable[dict[str, Any]],
    value: Callable[[dict[str, Any]], float | None] = lambda r: r["dice_mean"],
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """:func:`summarise` of one method's scores (not a difference): one entry per (seed, site) row.

    Rows whose score is ``None`` or non-finite are left out. Rows must already be one cell
    (one method, mode, budget, readout, steps and split).
    """
    entries = [{"seed": r["seed"], "site": r["site"], "value": value(r)} for r in rows]
    return summarise([e for e in entries if _finite(e["value"])], "value", n_boot, seed=seed)


def meets_target(summary: dict[str, Any], threshold: float) -> bool:
    """True when the mean is at least ``threshold`` and the whole interval lies above 0."""
    return bool(summary["n_pairs"] > 0 and summary["mean"] >= threshold and summary["ci_low"] > 0.0)
