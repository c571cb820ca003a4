"""Feature exchange strategy: each site receives only the other sites' features of the previous round."""

import numpy as np
import pytest

from fedcontrast.methods.base import SiteUpdate, count_bytes
from fedcontrast.methods.exchange import FeatureExchange
from fedcontrast.methods.partitions import site_tag

SITES = ["site-1", "site-2", "site-3"]


def upload(site_index: int, rows: int, weight: float) -> dict:
    return {
        "weights/encoder.w": np.full(3, weight, dtype=np.float32),
        "features/embeddings": np.full((rows, 4), site_index, dtype=np.float32),
        "features/partitions": np.arange(rows, dtype=np.int64) % 2,
    }


def test_each_site_receives_only_the_other_sites_features():
    strategy = FeatureExchange({}, {"weights/encoder.w": np.zeros(3, dtype=np.float32)})
    for site in SITES:  # round 0: weights only
        assert count_bytes(strategy.message_for(site, 0))["features"] == 0
    updates = {
        s: SiteUpdate(upload(i + 1, rows=i + 2, weight=i + 1), num_samples=10 * (i + 1))
        for i, s in enumerate(SITES)
    }
    strategy.aggregate(updates, 0)
    for i, site in enumerate(SITES):
        message = strategy.message_for(site, 1)
        others = [j for j in range(len(SITES)) if j != i]
        expected_tags = [site_tag(SITES[j]) for j in others for _ in range(j + 2)]
        assert message["features/sites"].tolist() == expected_tags
        assert site_tag(site) not in message["features/sites"]
        assert sorted(set(message["features/embeddings"][:, 0].tolist())) == [j + 1 for j in others]
        assert len(message["features/partitions"]) == len(message["features/embeddings"])
        # FedAvg by samples: (1*10 + 2*20 + 3*30) / 60 = 140 / 60
        np.testing.assert_allclose(message["weights/encoder.w"], 140 / 60, rtol=1e-6)


def test_features_are_those_of_the_previous_round_only():
    strategy = FeatureExchange({}, {"weights/encoder.w": np.zeros(3, dtype=np.float32)})
    strategy.aggregate({s: SiteUpdate(upload(i + 1, 2, 0.0), 1) for i, s in enumerate(SITES)}, 0)
    # round 1: only site-1 answered; site-2 must now get site-1's features only, site-1 none
    strategy.aggregate({"site-1": SiteUpdate(upload(9, 2, 0.0), 1)}, 1)
    assert strategy.message_for("site-2", 2)["features/embeddings"][:, 0].tolist() == [9.0, 9.0]
    assert "features/embeddings" not in strategy.message_for("site-1", 2)


def test_uploads_may_not_tag_sites_or_be_ragged():
    strategy = FeatureExchange({}, {"weights/encoder.w": np.zeros(3, dtype=np.float32)})
    spoofed = {**upload(1, 2, 0.0), "features/sites": np.zeros(2, dtype=np.int64)}
    with pytest.raises(ValueError, match="only the server"):
        strategy.aggregate({"site-1": SiteUpdate(spoofed, 1)}, 0)
    ragged = {**upload(1, 2, 0.0), "features/partitions": np.zeros(3, dtype=np.int64)}
    with pytest.raises(ValueError, match="different lengths"):
        strategy.aggregate({"site-1": SiteUpdate(ragged, 1)}, 0)
