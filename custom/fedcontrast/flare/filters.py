"""Site-side result filters: the hospital's outbound policy, and the feature privacy filter.

:class:`OutboundPolicyFilter` lets a result leave the site only when every entry is one the
running method declares (:mod:`fedcontrast.methods.outbound`); anything else fails the
round, naming the entry, and nothing is sent. It belongs in the site's own
``local/privacy.json`` (:func:`fedcontrast.flare.site_config.write_privacy_policy`), where
the hospital, not the job's submitter, controls it.

The feature privacy filter clips each feature vector and adds Gaussian noise whose scale is
relative to the clip norm (the Gaussian mechanism's noise multiplier), so it means the same
on FCL's unit-norm projections as on any other scale. The transform itself is plain numpy,
:func:`fedcontrast.methods.privacy.privatize_features`, which the in-process runs
(:func:`~fedcontrast.methods.runner.run_in_process`, the benchmark) apply too.

Attached as a task-result filter on the sites, scoped to the pre-training task, so
it acts on what leaves a site and on nothing else. Only the floating-point
``features/`` entries are touched (the 128-d projections; integer entries are tags);
weights pass unchanged. Each row is scaled to L2 norm at most ``C`` (``clip_norm``; 0: C = 1,
no clipping, the norm of FCL's unit-norm projections), then ``N(0, (noise_std * C)^2)`` noise
is added to every value: the Gaussian mechanism with noise multiplier ``noise_std`` on one
row (L2 sensitivity 2C when a row is replaced; :func:`fedcontrast.methods.privacy.gaussian_epsilon`).
Both are off by default (0). What this does and does not guarantee: docs/deployment.md,
"What leaves a hospital".
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from fedcontrast.methods.outbound import OutboundPolicyError, OutboundSchema
from fedcontrast.methods.privacy import check_privacy_settings, privatize_features

__all__ = ["OUTBOUND_SCHEMA_PROP", "FeaturePrivacyFilter", "OutboundPolicyFilter", "privatize_features"]

#: ``FLContext`` property holding the running method's outbound schema (set by the executor).
OUTBOUND_SCHEMA_PROP = "fedcontrast.outbound_schema"


class FeaturePrivacyFilter(DXOFilter):
    """Clip and noise the ``features/`` entries of a site's result (see the module docstring).

    Args:
        clip_norm: C, largest L2 norm of a feature vector (0: no clipping).
        noise_std: noise multiplier, noise standard deviation ``noise_std * C`` (0: none).
        seed: seed of the noise (None: fresh entropy, what a real deployment wants).
    """

    def __init__(self, clip_norm: float = 0.0, noise_std: float = 0.0, seed: int | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        check_privacy_settings(clip_norm, noise_std)
        self.clip_norm = clip_norm
        self.noise_std = noise_std
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        """The DXO with its features privatized; None (unchanged) when the filter is off."""
        if self.clip_norm == 0 and self.noise_std == 0:
            return None
        dxo.data = privatize_features(dxo.data, self.clip_norm, self.noise_std, self._rng)
        return dxo


class OutboundPolicyFilter(Filter):
    """The hospital's outbound policy: only what the running method declares leaves the site.

    Reads the method's :class:`~fedcontrast.methods.outbound.OutboundSchema` from the task's
    context (put there by :class:`~fedcontrast.flare.executor.MethodExecutor`) and checks
    every entry of the result; error replies (nothing in them) pass. A refused result raises,
    so NVFlare replaces it with ``TASK_RESULT_FILTER_ERROR`` and sends nothing of it.

    Args:
        allow_features: False: no ``features/`` entry leaves this site, whatever the method.
        max_features_per_partition: the hospital's own cap on feature rows per partition
            (0: the method's K).

    Raises:
        OutboundPolicyError: (from :meth:`process`) the entry refused, with the site and round.
    """

    def __init__(self, allow_features: bool = True, max_features_per_partition: int = 0):
        super().__init__()
        if max_features_per_partition < 0:
            raise ValueError(f"max_features_per_partition must be >= 0, got {max_features_per_partition}")
        self.allow_features = allow_features
        self.max_features_per_partition = max_features_per_partition

    def site_schema(self, schema: OutboundSchema) -> OutboundSchema:
        """``schema`` narrowed by the hospital's settings."""
        per_partition = schema.features_per_partition
        if self.max_features_per_partition:
            per_partition = min(per_partition, self.max_features_per_partition)
        width = schema.feature_width if self.allow_features else 0
        return OutboundSchema(schema.entries, width, per_partition, schema.partitions, schema.scalar_stats)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """``shareable`` unchanged when the policy allows all of it; else raise (never sent)."""
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site = fl_ctx.get_identity_name()
        round_num = shareable.get_header(AppConstants.CURRENT_ROUND, "?")
        where = f"{site}: round {round_num}: outbound policy"
        schema = fl_ctx.get_prop(OUTBOUND_SCHEMA_PROP)
        if not isinstance(schema, OutboundSchema):
            raise OutboundPolicyError(f"{where}: the result carries no declared schema; not sent")
        try:
            data = from_shareable(shareable).data
        except Exception as exc:
            raise OutboundPolicyError(
                f"{where}: the result is not a message ({type(exc).__name__}); not sent"
            ) from None
        if not isinstance(data, dict):
            raise OutboundPolicyError(f"{where}: the result is not a message; not sent")
        try:
            self.site_schema(schema).check(data)
        except OutboundPolicyError as exc:
            raise OutboundPolicyError(f"{where}: {exc}; not sent") from None
        return shareable
