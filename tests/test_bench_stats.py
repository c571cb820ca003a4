"""Paired differences and bootstrap intervals against hand-computed cases (no training)."""

import math

import pytest

from fedcontrast.bench.stats import (
    PAIR_KEYS,
    bootstrap_ci,
    meets_target,
    paired_differences,
    seed_means,
    std_across_seeds,
    summarise,
    values_summary,
)


def row(method: str, seed: int, site: str, dice: float, **keys) -> dict:
    base = {
        "finetune": "federated",
        "n_labeled": 1,
        "readout": "finetune",
        "finetune_steps": 100,
        "eval_split": "test",
    }
    return {"method": method, "seed": seed, "site": site, "dice_mean": dice, **base, **keys}


#: 2 seeds x 2 sites; FCL minus random init is 0.1, 0.2 (seed 0) and 0.3, 0.4 (seed 1).
HAND = [
    row("random_init", 0, "a", 0.30),
    row("random_init", 0, "b", 0.40),
    row("random_init", 1, "a", 0.20),
    row("random_init", 1, "b", 0.10),
    row("fcl", 0, "a", 0.40),
    row("fcl", 0, "b", 0.60),
    row("fcl", 1, "a", 0.50),
    row("fcl", 1, "b", 0.50),
]


def test_paired_differences_match_seed_and_site():
    pairs = paired_differences(HAND, "fcl")
    assert [(p["seed"], p["site"]) for p in pairs] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert [p["difference"] for p in pairs] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert pairs[0]["method_value"] == 0.40 and pairs[0]["baseline_value"] == 0.30
    assert set(PAIR_KEYS) <= set(pairs[0])


def test_pairs_need_every_key_equal_and_skip_unmatched_or_nan_rows():
    rows = [
        *HAND,
        row("fcl", 2, "a", 0.9),  # no random init for seed 2
        row("fcl", 0, "a", 0.9, finetune_steps=50),  # another checkpoint, no partner
        row("fcl", 0, "a", 0.9, eval_split="validation"),
        row("fcl", 0, "a", 0.9, readout="probe"),
        row("fcl", 0, "a", 0.9, finetune="local"),
        row("random_init", 0, "a", 0.1, n_labeled=2),
        row("fedsimclr", 0, "a", 0.0),
    ]
    assert [p["difference"] for p in paired_differences(rows, "fcl")] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with_nan = [dict(r, dice_mean=float("nan")) if (r["seed"], r["site"]) == (1, "b") else r for r in HAND]
    assert len(paired_differences(with_nan, "fcl")) == 3
    probe = [
        row("random_init", 0, "a", 0.2, readout="probe"),
        row("fcl", 0, "a", 0.5, readout="probe"),
        *HAND,
    ]
    probe_pairs = [p for p in paired_differences(probe, "fcl") if p["readout"] == "probe"]
    assert [p["difference"] for p in probe_pairs] == pytest.approx([0.3])


def test_duplicate_rows_are_an_error():
    with pytest.raises(ValueError, match="two rows of fcl"):
        paired_differences([*HAND, row("fcl", 0, "a", 0.5)], "fcl")


def test_summary_by_hand():
    pairs = paired_differences(HAND, "fcl")
    assert seed_means(pairs) == pytest.approx({0: 0.15, 1: 0.35})
    assert std_across_seeds(pairs) == pytest.approx(math.sqrt(0.1**2 + 0.1**2))  # ddof 1, two seeds
    summary = summarise(pairs, n_boot=20_000)
    assert summary["mean"] == pytest.approx(0.25)
    assert (summary["n_pairs"], summary["n_seeds"], summary["n_sites"]) == (4, 2, 2)
    # Exact bootstrap of the mean of 4 draws from {0.1, 0.2, 0.3, 0.4}: mean = 0.1 + 0.025 S,
    # S a sum of 4 uniform draws from {0..3}. P(S <= 1) = 5/256 < 2.5% < P(S <= 2) = 15/256,
    # so the 2.5th percentile is S = 2 (0.15) and by symmetry the 97.5th is S = 10 (0.35).
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((0.15, 0.35))
    assert summary["ci_low"] < summary["mean"] < summary["ci_high"]
    # Resampling whole seeds: seed means 0.15 and 0.35; two draws give 0.15, 0.25 or 0.35 with
    # probabilities 1/4, 1/2, 1/4, so the interval is [0.15, 0.35] again.
    assert (summary["seed_ci_low"], summary["seed_ci_high"]) == pytest.approx((0.15, 0.35))


def test_seed_bootstrap_weights_groups_by_their_size_and_is_wider_for_shared_offsets():
    # one group only: every resample is that group, the interval is its mean
    assert bootstrap_ci([0.1, 0.2, 0.6], groups=["s", "s", "s"]) == pytest.approx((0.3, 0.3))
    # groups of 1 and 3 values: (a, a) -> 0.0, (b, b) -> 1.0 (1/4 each), mixed -> 3/4 (1/2), so the
    # 40th and 60th percentiles are both 3/4
    low, high = bootstrap_ci([0.0, 1.0, 1.0, 1.0], n_boot=4000, level=0.2, groups=["a", "b", "b", "b"])
    assert (low, high) == pytest.approx((0.75, 0.75))
    # sites that share a seed offset: the pair bootstrap is narrower than the seed bootstrap
    values = [0.0, 0.01, 0.02, 0.1, 0.11, 0.12, 0.2, 0.21, 0.22]
    seeds = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pair_low, pair_high = bootstrap_ci(values)
    seed_low, seed_high = bootstrap_ci(values, groups=seeds)
    assert seed_high - seed_low > pair_high - pair_low
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_ci(values, groups=seeds[:-1])


def test_bootstrap_is_reproducible_and_collapses_on_identical_values():
    values = [0.1, 0.2, 0.3, 0.4, 0.05, 0.33]
    assert bootstrap_ci(values, n_boot=500) == bootstrap_ci(values, n_boot=500)
    assert bootstrap_ci(values, n_boot=500, seed=1) != bootstrap_ci(values, n_boot=500)
    assert bootstrap_ci([0.07] * 4) == pytest.approx((0.07, 0.07))
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3))
    wider = bootstrap_ci(values, level=0.99)
    narrower = bootstrap_ci(values, level=0.5)
    assert wider[0] < narrower[0] < narrower[1] < wider[1]
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([0.1, float("nan")])


def test_target_needs_the_mean_and_the_interval():
    pairs = paired_differences(HAND, "fcl")
    assert meets_target(summarise(pairs), 0.05)
    assert not meets_target(summarise(pairs), 0.3)  # mean 0.25 below the threshold
    straddling = [dict(p, difference=d) for p, d in zip(pairs, [-0.2, 0.3, -0.1, 0.3])]
    summary = summarise(straddling)
    assert summary["mean"] == pytest.approx(0.075) and summary["ci_low"] < 0
    assert not meets_target(summary, 0.05)
    assert not meets_target(summarise([]), 0.05)
    assert math.isnan(summarise([])["mean"])


def test_values_summary_is_mean_and_seed_std_of_one_method():
    summary = values_summary([r for r in HAND if r["method"] == "random_init"])
    assert summary["mean"] == pytest.approx(0.25)
    assert summary["std_seeds"] == pytest.approx(math.sqrt(2) * 0.1)  # seed means 0.35, 0.15
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
