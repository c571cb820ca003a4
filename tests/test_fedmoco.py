"""FedMoCo's pieces: RSA weights and similarity, the intensity re-mapping, the key queue, the MoCo loss,
the server's forwarding and audit of ``stats/`` entries, and a short in-process run of each variant."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import spearmanr

from fedcontrast.methods.banks import KeyQueue
from fedcontrast.methods.base import SiteUpdate, pack, select
from fedcontrast.methods.fedmoco import RHO_ENTRY, FedMoCoStrategy
from fedcontrast.methods.losses import moco_loss
from fedcontrast.methods.metadata import (
    MAX_BINS,
    STATS_ENTRIES,
    IntensityStats,
    IntensityTransfer,
    intensity_stats,
    remap,
)
from fedcontrast.methods.partitions import site_tag
from fedcontrast.methods.rsa import rdm, rsa_similarity, rsa_weights, spearman
from fedcontrast.methods.runner import run_in_process


def test_rsa_weights_on_a_hand_computed_case():
    # w_k ∝ n_k exp(-rho_k / T): 100 e^-0.4 = 67.032, 300 e^-1.6 = 60.569 -> 0.52532, 0.47468
    weights = rsa_weights({"a": 0.2, "b": 0.8}, {"a": 100, "b": 300}, temperature=0.5)
    assert weights == pytest.approx({"a": 0.52532, "b": 0.47468}, abs=1e-5)
    # "similar" flips the sign: 100 e^0.4 = 149.18, 300 e^1.6 = 1485.9 -> 0.09124, 0.90876
    similar = rsa_weights({"a": 0.2, "b": 0.8}, {"a": 100, "b": 300}, temperature=0.5, direction="similar")
    assert similar == pytest.approx({"a": 0.09124, "b": 0.90876}, abs=1e-5)
    # three sites, equal counts: softmax(-[0, 0.5, 1] / 1) = [1, e^-0.5, e^-1] / 1.97441
    three = rsa_weights({"x": 0.0, "y": 0.5, "z": 1.0}, {"x": 10, "y": 10, "z": 10}, temperature=1.0)
    total = 1 + math.exp(-0.5) + math.exp(-1.0)
    assert three == pytest.approx({"x": 1 / total, "y": math.exp(-0.5) / total, "z": math.exp(-1) / total})
    assert three["x"] == pytest.approx(0.50648, abs=1e-5)
    # a large temperature tends to FedAvg by samples
    assert rsa_weights({"a": 0.2, "b": 0.8}, {"a": 1, "b": 3}, temperature=1e6) == pytest.approx(
        {"a": 0.25, "b": 0.75}
    )
    with pytest.raises(ValueError, match="rsa_direction"):
        rsa_weights({"a": 0.1}, {"a": 1}, direction="up")
    with pytest.raises(ValueError, match="same sites"):
        rsa_weights({"a": 0.1}, {"b": 1})


def test_rdm_and_spearman_match_scipy():
    rng = np.random.default_rng(0)
    local, reference = rng.normal(size=(12, 16)), rng.normal(size=(12, 8))
    np.testing.assert_allclose(rdm(local), squareform(pdist(local, "correlation")), atol=1e-12)
    a, b = rng.normal(size=30), rng.integers(0, 5, size=30).astype(float)  # b has many ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    expected = spearmanr(pdist(local, "correlation"), pdist(reference, "correlation")).statistic
    assert rsa_similarity(local, reference) == pytest.approx(expected, abs=1e-12)
    assert rsa_similarity(local, 3 * local + 1) == pytest.approx(1.0)
    collapsed = np.tile(reference[:1], (12, 1))  # every probe sample embedded alike
    assert rsa_similarity(local, collapsed) == 0.0
    with pytest.raises(ValueError, match="constant"):
        rdm(np.ones((3, 4)))


def scanner_volume(labels: np.ndarray, means: list[float], gamma: float, seed: int) -> np.ndarray:
    """A z-scored volume of a label map as one 'scanner' renders it (tissue means, noise, a gamma)."""
    rng = np.random.default_rng(seed)
    image = np.asarray(means)[labels] + rng.normal(0, 0.08, labels.shape)
    image = np.clip(image, 0, None) ** gamma
    return (image - image.mean()) / image.std()


@pytest.fixture
def label_map() -> np.ndarray:
    """A (1, 32, 32, 8) map: background 0, a ring 2 around a disc 3, a crescent 1."""
    y, x = np.mgrid[:32, :32]
    r = np.hypot(y - 16, x - 18)
    plane = np.zeros((32, 32), dtype=np.int64)
    plane[(np.hypot(y - 16, x - 8) < 7) & (r > 9)] = 1
    plane[r < 9] = 2
    plane[r < 6] = 3
    return np.broadcast_to(plane[..., None], (32, 32, 8))[None].copy()


def test_remap_moves_a_volume_to_the_target_statistics_and_keeps_label_geometry(label_map):
    source = scanner_volume(label_map, [0.1, 0.5, 0.3, 0.9], 1.0, seed=1)
    target = scanner_volume(label_map, [0.05, 0.7, 0.2, 0.6], 2.0, seed=2)
    own = intensity_stats([torch.as_tensor(source)], bins=32)
    goal = intensity_stats([torch.as_tensor(target)], bins=32)
    assert own.hist.shape == (32,) and own.hist.sum() == pytest.approx(1.0)

    mapped = remap(source, own, goal, "histogram")
    after = intensity_stats([torch.as_tensor(mapped)], bins=32)
    before_distance = np.abs(own.hist - goal.hist).sum()
    assert after.mean == pytest.approx(goal.mean, abs=0.05) and after.std == pytest.approx(goal.std, rel=0.05)
    assert np.quantile(mapped, [0.1, 0.5, 0.9]) == pytest.approx(
        np.quantile(target, [0.1, 0.5, 0.9]), abs=0.1
    )
    # the histograms (same range) are much closer than before
    _, edges = np.histogram(target, bins=32)
    h_map, h_target = (np.histogram(v, bins=edges)[0] / v.size for v in (mapped, target))
    assert np.abs(h_map - h_target).sum() < 0.35 * before_distance
    # label geometry: the map is strictly increasing, so voxel order (every intensity boundary) is kept
    order = np.argsort(source, axis=None)
    rises = np.diff(source.ravel()[order]) > 0
    steps = np.diff(mapped.ravel()[order])
    assert np.all(steps[rises] > 0) and np.all(steps[~rises] == 0)
    assert mapped.shape == source.shape

    standardised = remap(source, own, goal, "meanstd")
    assert standardised.mean() == pytest.approx(goal.mean, abs=1e-9)
    assert standardised.std() == pytest.approx(goal.std, rel=1e-9)
    np.testing.assert_allclose(remap(source, own, goal, "histogram", strength=0.0), source)
    half = remap(source, own, goal, "histogram", strength=0.5)
    np.testing.assert_allclose(half, (source + mapped) / 2)


def test_intensity_statistics_round_trip_and_refuse_fine_histograms(label_map):
    stats = intensity_stats(
        [torch.as_tensor(scanner_volume(label_map, [0.1, 0.5, 0.3, 0.9], 1.0, 0))], bins=16
    )
    entries = stats.to_entries()
    assert set(entries) == set(STATS_ENTRIES) and sum(np.asarray(v).size for v in entries.values()) == 16 + 4
    back = IntensityStats.from_entries(entries)
    assert (back.mean, back.std, back.low, back.high) == pytest.approx(
        (stats.mean, stats.std, stats.low, stats.high)
    )
    with pytest.raises(ValueError, match="bins"):
        intensity_stats([torch.zeros(4) + torch.arange(4)], bins=MAX_BINS + 1)
    with pytest.raises(ValueError, match="1-D"):
        IntensityStats(0.0, 1.0, -1.0, 1.0, np.ones(MAX_BINS + 1))


def test_intensity_transfer_applies_with_its_probability(label_map):
    a = torch.as_tensor(scanner_volume(label_map, [0.1, 0.5, 0.3, 0.9], 1.0, 0), dtype=torch.float32)
    b = torch.as_tensor(scanner_volume(label_map, [0.05, 0.7, 0.2, 0.6], 2.0, 1), dtype=torch.float32)
    images = torch.stack([a[..., z] for z in range(8)])  # (8, 1, 32, 32) slices
    own, other = intensity_stats([a]), intensity_stats([b])
    transfer = IntensityTransfer(own, prob=1.0, seed=0)
    assert torch.equal(transfer(images), images)  # no targets yet: unchanged
    transfer.set_targets([other])
    out = transfer(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert all(not torch.equal(o, i) for o, i in zip(out, images))
    never = IntensityTransfer(own, prob=0.0, seed=0)
    never.set_targets([other])
    assert torch.equal(never(images), images)
    with pytest.raises(ValueError, match="metadata_prob"):
        IntensityTransfer(own, prob=1.5)


def test_key_queue_is_fifo():
    queue = KeyQueue(dim=2, capacity=5)
    assert len(queue) == 0 and queue.keys().shape == (0, 2)
    rows = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    queue.enqueue(rows[:3])
    torch.testing.assert_close(queue.keys(), rows[:3])
    queue.enqueue(rows[3:])  # 7 enqueued, capacity 5: the two oldest are gone
    torch.testing.assert_close(queue.keys(), rows[2:])
    queue.enqueue(rows[:1])
    torch.testing.assert_close(queue.keys(), torch.cat([rows[3:], rows[:1]]))
    with pytest.raises(ValueError, match="shape"):
        queue.enqueue(torch.zeros(1, 3))


def test_moco_loss_matches_the_formula():
    rng = torch.Generator().manual_seed(0)
    q, k, queue = (torch.nn.functional.normalize(torch.randn(n, 8, generator=rng), dim=1) for n in (3, 3, 5))
    tau = 0.2
    expected = []
    for i in range(3):
        pos = torch.exp(q[i] @ k[i] / tau)
        expected.append(-torch.log(pos / (pos + torch.exp(queue @ q[i] / tau).sum())))
    torch.testing.assert_close(
        moco_loss(q, k, queue, tau, batch_negatives=False), torch.stack(expected).mean()
    )
    expected = []
    for i in range(3):
        pos = torch.exp(q[i] @ k[i] / tau)
        negatives = torch.cat([k[torch.arange(3) != i], queue])
        expected.append(-torch.log(pos / (pos + torch.exp(negatives @ q[i] / tau).sum())))
    torch.testing.assert_close(moco_loss(q, k, queue, tau), torch.stack(expected).mean())


def site_update(seed: int, rho: float, samples: int, bins: int = 32, **extra: np.ndarray) -> SiteUpdate:
    rng = np.random.default_rng(seed)
    hist = rng.random(bins)
    stats = IntensityStats(float(seed), 1.0 + seed, -2.0, 3.0 + seed, hist / hist.sum()).to_entries()
    message = {
        **pack("weights", {"w": np.full(3, float(seed), dtype=np.float32)}),
        **pack("stats", {**stats, RHO_ENTRY: np.float64(rho), **extra}),
    }
    return SiteUpdate(message=message, num_samples=samples)


def test_strategy_weights_by_rsa_and_forwards_only_other_sites_statistics():
    strategy = FedMoCoStrategy({"rsa_temperature": 0.5}, pack("weights", {"w": np.zeros(3, np.float32)}))
    assert strategy.message_for("site-1", 0).keys() == {"weights/w"}
    updates = {"site-1": site_update(1, 0.2, 100), "site-2": site_update(2, 0.8, 300)}
    strategy.aggregate(updates, 0)
    np.testing.assert_allclose(strategy.global_message["weights/w"], 0.52532 * 1 + 0.47468 * 2, atol=1e-4)
    metrics = strategy.round_metrics(0)
    assert metrics["rsa_weight/site-1"] == pytest.approx(0.52532, abs=1e-5)
    assert metrics["rsa_rho/site-2"] == pytest.approx(0.8)
    down = select(strategy.message_for("site-1", 1), "stats")
    assert down["meta_sites"].tolist() == [site_tag("site-2")]
    sent = select(updates["site-2"].message, "stats")
    for name in STATS_ENTRIES:
        np.testing.assert_array_equal(down[name][0], sent[name])
    assert RHO_ENTRY not in down

    with pytest.raises(ValueError, match="site-2 sent stats/ entries"):
        strategy.aggregate(
            {"site-1": site_update(1, 0.2, 1), "site-2": site_update(2, 0.8, 1, voxels=np.ones(9))}, 1
        )
    with pytest.raises(ValueError, match="site-2: stats/rsa_rho must be finite"):
        strategy.aggregate({"site-1": site_update(1, 0.2, 1), "site-2": site_update(2, float("nan"), 1)}, 1)
    with pytest.raises(ValueError, match=r"site-1: stats/meta_hist has shape \(64,\)"):
        strategy.aggregate({"site-1": site_update(1, 0.2, 1, bins=64), "site-2": site_update(2, 0.8, 1)}, 1)

    plain = FedMoCoStrategy(
        {"rsa": False, "metadata": False}, pack("weights", {"w": np.zeros(3, np.float32)})
    )
    bare = {s: SiteUpdate(message=select_weights(u), num_samples=u.num_samples) for s, u in updates.items()}
    plain.aggregate(bare, 0)
    np.testing.assert_allclose(plain.global_message["weights/w"], 0.25 * 1 + 0.75 * 2)
    assert plain.round_metrics(0) == {} and plain.message_for("site-1", 1).keys() == {"weights/w"}


def select_weights(update: SiteUpdate) -> dict[str, np.ndarray]:
    return {k: v for k, v in update.message.items() if k.startswith("weights/")}


@pytest.mark.parametrize(
    ("method", "stats_up"),
    [
        ("fedmoco", {*STATS_ENTRIES, RHO_ENTRY}),
        ("fedmoco_nometa", {RHO_ENTRY}),
        ("fedmoco_norsa", set(STATS_ENTRIES)),
    ],
)
def test_each_variant_runs_and_uploads_only_its_statistics(phantom_images, tiny_fcl_config, method, stats_up):
    config = {**tiny_fcl_config, "queue_size": 8}
    result = run_in_process(method, config, phantom_images(1), rounds=2)
    for site, message in result.final_messages.items():
        assert set(select(message, "stats")) == stats_up, site
        assert {k.split("/", 1)[0] for k in message} <= {"weights", "stats"}
    rounds = [h for h in result.history if h["round"] == 1]
    assert all(h["metrics"]["queue_len"] == 8 and np.isfinite(h["metrics"]["loss"]) for h in rounds)
    # round 1 brings the other site's statistics (metadata transfer only)
    assert all((h["bytes_down"]["stats"] > 0) == (STATS_ENTRIES[0] in stats_up) for h in rounds)
    has_rsa = RHO_ENTRY in stats_up
    assert all(("rsa_weight/site-1" in m) == has_rsa for m in result.server_metrics)
