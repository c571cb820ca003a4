"""What a method may send out of a site: its outbound schema, declared next to its trainer.

Every :class:`~fedcontrast.methods.base.SiteTrainer` declares what its uploads may hold with
the class method :meth:`~fedcontrast.methods.base.SiteTrainer.outbound_schema`; the default
is derived from the method's own model, so a new method needs no code for it:

- ``weights/``, ``target/`` and ``stats/`` entries named in the round-0 message
  (:meth:`~fedcontrast.methods.base.SiteTrainer.initial_message`: the bundle network, the
  heads, a target network), each with exactly that shape and dtype;
- any other ``stats/<name>`` only as a numeric **scalar** (a step count, a flag);
- ``features/`` only for a method that exchanges features (a contrastive method whose
  configuration holds ``features_per_partition`` K > 0): ``features/embeddings`` float32
  ``(n, D)`` with ``D`` the method's embedding width and at most K rows per partition
  (``n <= K * S``), and the integer tag ``features/partitions`` ``(n,)`` with values in
  ``[0, S)`` and each partition at most K times.

Anything else (another key, a shape or dtype that differs, more rows, NaN/Inf values)
is refused with :class:`OutboundPolicyError` naming the entry. The check is plain numpy: the
site's NVFlare result filter (:class:`fedcontrast.flare.filters.OutboundPolicyFilter`,
configured in the hospital's ``local/privacy.json``) runs it before anything leaves, and the
server runs it again on every update it receives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcontrast.methods.base import KINDS, non_finite_entries

#: The feature entries a schema with features allows.
EMBEDDINGS = "features/embeddings"
PARTITIONS = "features/partitions"


class OutboundPolicyError(ValueError):
    """A message entry the method's outbound schema does not allow; the message names it."""


@dataclass(frozen=True)
class OutboundSchema:
    """The entries a site may upload.

    Attributes:
        entries: key -> ``(shape, dtype name)`` of the declared ``weights/``, ``target/`` and
            ``stats/`` entries.
        feature_width: D, the embedding width (0: no ``features/`` entry at all).
        features_per_partition: K, most feature rows per partition.
        partitions: S, the number of partitions (``features/partitions`` values lie in ``[0, S)``).
        scalar_stats: allow undeclared ``stats/`` entries that are numeric scalars.
    """

    entries: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    feature_width: int = 0
    features_per_partition: int = 0
    partitions: int = 0
    scalar_stats: bool = True

    @classmethod
    def from_message(cls, message: Mapping[str, np.ndarray], **features: int) -> OutboundSchema:
        """A schema allowing ``message``'s entries with their shapes and dtypes, plus ``features``
        (``feature_width``, ``features_per_partition``, ``partitions``)."""
        entries = {k: (tuple(np.shape(v)), np.asarray(v).dtype.name) for k, v in message.items()}
        return cls(entries={k: v for k, v in entries.items() if not k.startswith("features/")}, **features)

    def check(self, message: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`OutboundPolicyError` naming the first entry the schema does not allow.

        Shapes: ``features/embeddings`` ``(n, D)``; ``features/partitions`` ``(n,)``.
        """
        non_finite = non_finite_entries(message)
        if non_finite:
            key = next(iter(non_finite))
            raise OutboundPolicyError(f"entry {key!r}: {non_finite[key]} non-finite value(s) (NaN/Inf)")
        features = {k: np.asarray(v) for k, v in message.items() if k.startswith("features/")}
        for key, value in message.items():
            if key in features:
                continue
            value = np.asarray(value)
            kind = key.split("/", 1)[0]
            if kind not in KINDS:
                raise OutboundPolicyError(f"entry {key!r}: unknown kind (allowed: {KINDS})")
            if key in self.entries:
                shape, dtype = self.entries[key]
                if value.shape != shape or value.dtype.name != dtype:
                    raise OutboundPolicyError(
                        f"entry {key!r}: {value.dtype.name} {value.shape}, "
                        f"the method declares {dtype} {shape}"
                    )
            elif kind == "stats" and self.scalar_stats and value.shape == () and _numeric(value):
                continue
            else:
                raise OutboundPolicyError(
                    f"entry {key!r} ({value.dtype.name} {value.shape}) is not in the method's outbound schema"
                )
        if features:
            self._check_features(features)

    def _check_features(self, features: dict[str, np.ndarray]) -> None:
        if not self.feature_width:
            raise OutboundPolicyError(f"entry {next(iter(features))!r}: this method sends no features")
        extra = sorted(set(features) - {EMBEDDINGS, PARTITIONS})
        if extra:
            raise OutboundPolicyError(f"entry {extra[0]!r} is not in the method's outbound schema")
        if EMBEDDINGS not in features or PARTITIONS not in features:
            raise OutboundPolicyError(f"features must come as {EMBEDDINGS!r} with {PARTITIONS!r}")
        emb, parts = features[EMBEDDINGS], features[PARTITIONS]
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[1] != self.feature_width:
            raise OutboundPolicyError(
                f"entry {EMBEDDINGS!r}: {emb.dtype.name} {emb.shape}, "
                f"the method sends float32 (n, {self.feature_width})"
            )
        if not np.issubdtype(parts.dtype, np.integer) or parts.shape != emb.shape[:1]:
            raise OutboundPolicyError(
                f"entry {PARTITIONS!r}: {parts.dtype.name} {parts.shape}, expected integers ({emb.shape[0]},)"
            )
        if parts.size and (parts.min() < 0 or parts.max() >= self.partitions):
            raise OutboundPolicyError(f"entry {PARTITIONS!r}: values outside [0, {self.partitions})")
        counts = np.bincount(parts, minlength=self.partitions) if parts.size else np.zeros(1, dtype=int)
        if counts.max() > self.features_per_partition:
            raise OutboundPolicyError(
                f"entry {EMBEDDINGS!r}: {int(counts.max())} rows in one partition, the method sends "
                f"at most {self.features_per_partition}"
            )


def _numeric(value: np.ndarray) -> bool:
    return bool(np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_)
