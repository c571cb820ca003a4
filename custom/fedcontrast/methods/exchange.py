"""Server strategy for feature exchange: FedAvg of the weights, other sites' features to each site.

Feature message layout (every method that exchanges features uses it):

- upload (site -> server): ``features/<name>`` arrays sharing their first axis, one
  row per feature, e.g. for FCL ``features/embeddings`` ``(K, C)`` float32 (unit-norm
  projections) and ``features/partitions`` ``(K,)`` int64. A site never tags its
  own uploads: the server knows who sent them.
- download (server -> site): the same ``features/<name>`` entries, concatenated over
  every *other* site that uploaded in the previous round (sites in sorted name order),
  plus ``features/sites`` ``(K_total,)`` int64, the
  :func:`~fedcontrast.methods.partitions.site_tag` of each row's sender. A site never
  receives its own rows; in round 0, or when no other site uploaded, there is no
  ``features/`` entry at all.

Only floating-point ``features/`` entries are features (what a privacy filter may
clip and noise); integer entries are tags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedcontrast.methods.banks import PartitionBank
from fedcontrast.methods.base import Message, ServerStrategy, SiteUpdate, message_key, select
from fedcontrast.methods.partitions import site_tag

#: Name of the server-added tag entry (``features/sites``).
SITES_ENTRY = "sites"


class FeatureExchange(ServerStrategy):
    """FedAvg of ``weights`` (by samples seen) and per-site exchange of ``features``.

    Args:
        config: the method's configuration.
        initial: round-0 global message (weights).
    """

    def __init__(self, config: Mapping[str, Any], initial: Message):
        super().__init__(config, initial)
        #: site -> its ``features/`` entries of the last round (prefix stripped).
        self.features: dict[str, dict[str, np.ndarray]] = {}

    def message_for(self, site: str, round_num: int) -> Message:
        """Global weights plus the features the other sites uploaded in the previous round."""
        return {**super().message_for(site, round_num), **self.features_for(site)}

    def features_for(self, site: str) -> Message:
        """The pooled ``features/`` entries of every site but ``site`` (empty when there are none)."""
        others = [s for s in sorted(self.features) if s != site]
        if not others:
            return {}
        names = list(self.features[others[0]])
        pooled = {
            message_key("features", n): np.concatenate([self.features[s][n] for s in others]) for n in names
        }
        rows = [len(next(iter(self.features[s].values()))) for s in others]
        tags = np.concatenate([np.full(r, site_tag(s), dtype=np.int64) for s, r in zip(others, rows)])
        pooled[message_key("features", SITES_ENTRY)] = tags
        return pooled

    def aggregate(self, updates: Mapping[str, SiteUpdate], round_num: int) -> None:
        """Average the weights; replace the pool by this round's uploaded features."""
        super().aggregate(updates, round_num)
        self.features = {}
        for site, update in updates.items():
            entries = select(update.message, "features")
            if not entries:
                continue
            if SITES_ENTRY in entries:
                raise ValueError(f"{site} uploaded 'features/{SITES_ENTRY}', which only the server sets")
            lengths = {name: len(value) for name, value in entries.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{site} uploaded features/ entries of different lengths: {lengths}")
            self.features[site] = entries


def refill_remote_bank(bank: PartitionBank, incoming: Message) -> None:
    """Replace ``bank``'s contents with the other sites' features of ``incoming`` (empty in round 0)."""
    features = select(incoming, "features")
    if not features:
        bank.clear()
        return
    bank.replace(
        torch.as_tensor(features["embeddings"]),
        torch.as_tensor(features["partitions"]),
        torch.as_tensor(features[SITES_ENTRY]),
    )
