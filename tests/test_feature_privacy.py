"""The feature privacy transform in process: what the server and the other sites receive, that
it is off (bit for bit) at C = Z = 0, that the bench carries it, and the (ε, δ) of the
Gaussian mechanism it is. The NVFlare filter that shares the transform is tested in
test_flare_components.py."""

import math

import numpy as np
import pytest
from scipy.special import ndtr

import fedcontrast.bench.protocol as protocol
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.privacy import (
    FeaturePrivacy,
    feature_privacy_from_config,
    gaussian_delta,
    gaussian_epsilon,
)
from fedcontrast.methods.runner import run_in_process


def test_feature_privacy_is_reproducible_per_site_and_round_and_off_when_unset():
    message = {
        "features/embeddings": np.eye(4, 8, dtype=np.float32),
        "features/partitions": np.arange(4),
        "weights/w": np.ones(3, dtype=np.float32),
    }
    noisy = FeaturePrivacy(1.0, 0.5, seed=3)
    a, b = noisy("site-1", 2, message), FeaturePrivacy(1.0, 0.5, seed=3)("site-1", 2, message)
    assert np.array_equal(a["features/embeddings"], b["features/embeddings"])
    for other in (
        noisy("site-2", 2, message),
        noisy("site-1", 1, message),
        FeaturePrivacy(1.0, 0.5, 4)("site-1", 2, message),
    ):
        assert not np.array_equal(a["features/embeddings"], other["features/embeddings"])
    assert (
        a["weights/w"] is message["weights/w"] and a["features/partitions"] is message["features/partitions"]
    )
    assert feature_privacy_from_config({"seed": 1}) is None
    assert feature_privacy_from_config({"feature_clip": 0, "feature_noise": 0}) is None
    assert feature_privacy_from_config({"feature_clip": 1, "feature_noise": 2, "seed": 5}) == FeaturePrivacy(
        1.0, 2.0, 5
    )
    with pytest.raises(ValueError, match=">= 0"):
        feature_privacy_from_config({"feature_noise": -1})


@pytest.fixture(scope="module")
def unfiltered(phantom_images, tiny_fcl_config):
    """Two rounds of tiny FCL on two sites without any site filter."""
    return run_in_process("fcl", tiny_fcl_config, phantom_images(1), rounds=2)


def test_the_server_and_the_other_sites_receive_only_the_filtered_features(
    phantom_images, unfiltered, tiny_fcl_config, monkeypatch
):
    privacy = FeaturePrivacy(clip_norm=0.5, noise_std=0.5, seed=0)
    sent: dict[tuple[str, int], tuple[dict, dict]] = {}

    def site_filter(site, round_num, message):
        sent[site, round_num] = (message, privacy(site, round_num, message))
        return sent[site, round_num][1]

    incoming: dict[str, list[dict]] = {}
    begin = FCLTrainer.begin_round

    def spy_begin(self, message):
        incoming.setdefault(self.site, []).append(message)
        return begin(self, message)

    monkeypatch.setattr(FCLTrainer, "begin_round", spy_begin)
    received: dict[int, dict] = {}
    filtered = run_in_process(
        "fcl",
        tiny_fcl_config,
        phantom_images(1),
        rounds=2,
        site_filter=site_filter,
        on_round=lambda r, updates, _g: received.update({r: updates}),
    )
    assert sorted(sent) == [("site-1", 0), ("site-1", 1), ("site-2", 0), ("site-2", 1)]
    for (site, round_num), (raw, out) in sent.items():
        assert out.keys() == raw.keys()
        for key, value in raw.items():
            if key == "features/embeddings":  # clipped to 0.5 and noised: changed, same shape and dtype
                assert out[key].shape == value.shape and out[key].dtype == np.float32
                assert not np.allclose(out[key], value, atol=0.05)
            else:  # weights and the integer partition tags pass as they are
                assert out[key] is value, key
            # the server holds exactly what left the site
            np.testing.assert_array_equal(received[round_num][site].message[key], out[key], err_msg=key)
    # round 1: each site's remote features are the other site's filtered round-0 features
    for site, other in (("site-1", "site-2"), ("site-2", "site-1")):
        np.testing.assert_array_equal(
            incoming[site][1]["features/embeddings"], sent[other, 0][1]["features/embeddings"]
        )
    # the ledger counts what is sent: same shapes and dtypes, so the same bytes
    assert [h["bytes_up"] for h in filtered.history] == [h["bytes_up"] for h in unfiltered.history]
    # and what the other sites received changed their training
    weights = [k for k in unfiltered.global_message if k.startswith("weights/")]
    assert any(not np.array_equal(filtered.global_message[k], unfiltered.global_message[k]) for k in weights)


def test_no_clip_and_no_noise_is_bit_identical_to_no_filter(phantom_images, unfiltered, tiny_fcl_config):
    off = run_in_process(
        "fcl", tiny_fcl_config, phantom_images(1), rounds=2, site_filter=FeaturePrivacy(0.0, 0.0, seed=0)
    )
    assert off.global_message.keys() == unfiltered.global_message.keys()
    for key, value in unfiltered.global_message.items():
        np.testing.assert_array_equal(off.global_message[key], value, err_msg=key)
    for site, messages in unfiltered.final_messages.items():
        for key, value in messages.items():
            np.testing.assert_array_equal(off.final_messages[site][key], value, err_msg=f"{site} {key}")


def test_the_bench_pretraining_carries_the_privacy_overrides(monkeypatch, tmp_path):
    seen = []

    class StopRunError(Exception):
        pass

    def fake_run(method, config, entries, rounds, **kwargs):
        seen.append(kwargs.get("site_filter"))
        raise StopRunError

    monkeypatch.setattr(protocol, "run_in_process", fake_run)
    datalists = {"site-1": {"training": [], "unlabeled": []}}
    for overrides, expected in (
        ({}, None),
        ({"feature_clip": 1.0, "feature_noise": 2.0}, FeaturePrivacy(1.0, 2.0, seed=7)),
    ):
        config = protocol.BenchConfig(pretrain_overrides=overrides)
        with pytest.raises(StopRunError):
            protocol.pretrain_unit(config, "fcl", 7, datalists, tmp_path)
        assert seen[-1] == expected


@pytest.mark.parametrize("mu", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_gaussian_epsilon_meets_delta_exactly(mu):
    epsilon = gaussian_epsilon(sensitivity=2.0, sigma=2.0 / mu, delta=1e-5)
    # independent check: δ(ε) = E[(1 - exp(ε - L))+], privacy loss L ~ N(μ²/2, μ²)
    loss = np.linspace(mu**2 / 2 - 12 * mu, mu**2 / 2 + 12 * mu, 400_001)
    density = np.exp(-((loss - mu**2 / 2) ** 2) / (2 * mu**2)) / (mu * math.sqrt(2 * math.pi))
    delta = np.trapezoid(np.clip(1 - np.exp(epsilon - loss), 0, None) * density, loss)
    assert delta == pytest.approx(1e-5, rel=1e-3)
    assert gaussian_delta(epsilon, mu) == pytest.approx(1e-5, rel=1e-6)
    assert gaussian_delta(epsilon, mu) == pytest.approx(
        ndtr(mu / 2 - epsilon / mu) - math.exp(epsilon) * ndtr(-mu / 2 - epsilon / mu), rel=1e-9
    )
    classic = 2.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / (2.0 / mu)
    if classic <= 1:  # where the classic bound holds, the exact ε is smaller
        assert epsilon < classic
    assert gaussian_epsilon(2.0, 0.0) == math.inf
    assert gaussian_epsilon(2.0, 4.0 / mu) < epsilon  # more noise, smaller ε
