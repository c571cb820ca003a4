"""Keeping the sites' target (EMA) networks in step: plain averaging, PTNU and DP (SPEC §2).

BYOL-style methods train an online network θ and a target network ξ, an EMA of
θ with momentum m updated after every local step. Three ways to keep the
sites' targets in step (config key ``target_update``):

- ``"average"`` (federated BYOL): every site uploads its target ``ξ_k``; the server
  averages the targets like the weights and sends the average back every round.
- ``"ptnu"`` (predictive target network update): the target is never downloaded.
  At the start of round r >= 1 every site replaces the target it holds by::

      ξ(r) = μ · ξ(r-1) + (1 - μ) · θ_global(r)                      (predict_target)

  from the target it already holds and the online weights it just received.
  ``μ`` is sent by the server as the scalar ``stats/ema_factor`` (8 bytes): the
  sample-weighted mean over the sites of ``m ** n_k``, ``n_k`` the local steps site k
  reported (``stats/steps``) in round r-1, i.e. ``m ** n`` when every site takes n
  steps. Every site evaluates the same expression (float64, cast back to the
  entry's dtype) on the same inputs, so all sites hold bit-identical targets; in
  round 0 the target is the received online network's encoder and head.
  The sites' training never uses an uploaded target under PTNU, so by default
  (``ptnu_upload`` False) the target never leaves a site either. With ``ptnu_upload``
  True every site uploads ``ξ_k`` every round, only so that the server can measure how
  far the prediction lies from the average of the sites' real targets (``target_gap``,
  a monitoring metric; NaN without uploads). The communication benchmark
  (``benchmarks/results/communication.md``) shows both settings train bit-identical
  encoders, the upload costing the size of the target every round.
- ``"ptnu_dp"`` (PTNU with distance prediction): as PTNU, but site k uploads ``ξ_k``
  only when (``should_upload``)::

      d_k = (1 - m ** n_k) · ‖θ_k - θ_global(r)‖ / ‖θ_global(r)‖ > δ    (predicted_distance)

  or when ``(r + 1) % T == 0`` (the safety sync of every T-th round, all sites
  together). ``d_k`` predicts the distance of ``ξ_k`` from the predicted global
  target: after n_k steps ``ξ_k ≈ μ_k ξ + (1 - μ_k) θ_k`` while the prediction is
  ``μ ξ + (1 - μ) θ_global``, so the two differ by about ``(1 - μ)(θ_k - θ_global)``;
  the site knows θ_global(r) (received) but not θ_global(r+1), which it approximates
  by θ_global(r). The server keeps a running target ``ξ_srv``: the sample-weighted
  mean of the uploaded ``ξ_k`` and, for each site that did not upload, its
  prediction ``m ** n_k · ξ_srv + (1 - m ** n_k) · θ_k`` from the online weights it
  did upload (``fold_targets``). When ``‖ξ_srv - ξ_pred‖ / ‖ξ_srv‖ > δ`` it sends
  ``ξ_srv`` once as ``target/`` entries (a correction, ``needs_correction``) and every
  site holds it instead of its prediction.

Distances are relative L2 norms (:func:`relative_distance`) over the target's parameters
taken as one vector, so δ is dimensionless. BatchNorm running statistics are left out:
the target runs in training mode (batch statistics), so they never change its outputs,
and its own forward passes move them far from any EMA prediction. They are still
predicted with the same formula, so the sites hold identical copies. Target states are
``{name: ndarray}`` dicts named like the online network's state (``encoder.*``, ``head.*``),
i.e. message entries without their kind.

With a reduced ``transfer`` precision (:mod:`fedcontrast.methods.transfer`) the sites predict
from the online weights and corrections as they arrive (decoded from float16 or 8 bits); the
server predicts from the same round-tripped values, so its copy stays bit-identical to theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedcontrast.methods.base import (
    Message,
    ServerStrategy,
    SiteUpdate,
    check_choice,
    merge_config,
    pack,
    select,
    weighted_average,
)
from fedcontrast.methods.transfer import round_trip, transfer_precision

State = Mapping[str, np.ndarray]

#: The ``target_update`` modes.
TARGET_UPDATES: tuple[str, ...] = ("average", "ptnu", "ptnu_dp")

#: Name of the server's ``stats/`` entry holding μ and of the sites' ``stats/`` step count.
EMA_FACTOR_ENTRY = "ema_factor"
STEPS_ENTRY = "steps"

#: Last parts of the state names of normalisation statistics (BatchNorm running mean, variance and
#: batch counter). The target network runs in training mode (batch statistics), so these never
#: change its outputs; distances leave them out.
NORM_STATISTICS: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")

#: Configuration of the target synchronisation (merged into every BYOL-style method's DEFAULTS).
SYNC_DEFAULTS: dict[str, Any] = {
    "momentum": 0.99,
    "target_update": "average",
    # chosen on the δ sweep (benchmarks/results/communication.md): at 1e-3 and below every site
    # uploads its target every round (predicted distances 0.009 early, 0.0007 late); at 1e-2 only
    # the T sync uploads, the real targets stay 1e-4 from the prediction, bytes fall from 0.955x
    # to 0.695x federated BYOL's and fine-tuned Dice is unchanged (paired +0.020 [-0.002, +0.046])
    "delta": 1e-2,
    "sync_every": 5,
    "ptnu_upload": False,
}


def check_sync_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` on an unknown ``target_update``, m outside [0, 1], δ < 0 or ``sync_every < 1``."""
    check_choice(config, "target_update", TARGET_UPDATES)
    if not 0.0 <= float(config["momentum"]) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {config['momentum']}")
    if float(config["delta"]) < 0:
        raise ValueError(f"delta must be >= 0, got {config['delta']}")
    if int(config["sync_every"]) < 1:
        raise ValueError(f"sync_every must be >= 1, got {config['sync_every']}")


def ema_factor(momentum: float, steps: int) -> float:
    """``m ** n``: the weight an EMA of momentum m leaves on its start after n updates."""
    return float(momentum) ** int(steps)


def predict_target(target: State, online: State, factor: float) -> dict[str, np.ndarray]:
    """``factor · target + (1 - factor) · online`` for every entry of ``target``.

    Args:
        target: the target state ξ to start from.
        online: online weights θ holding (at least) the keys of ``target``.
        factor: μ in [0, 1].

    Returns:
        A new state with ``target``'s keys and dtypes; floating entries computed in
        float64 and cast back, integer entries (BatchNorm counters) copied from ``online``.
    """
    predicted = {}
    for name, xi in target.items():
        theta = np.asarray(online[name])
        if np.issubdtype(xi.dtype, np.floating):
            value = factor * xi.astype(np.float64) + (1.0 - factor) * theta.astype(np.float64)
            predicted[name] = value.astype(xi.dtype)
        else:
            predicted[name] = theta.copy()
    return predicted


def is_compared(name: str, value: np.ndarray) -> bool:
    """Whether distances include a state entry: floating point and not a normalisation statistic."""
    return np.issubdtype(value.dtype, np.floating) and name.rsplit(".", 1)[-1] not in NORM_STATISTICS


def relative_distance(a: State, b: State) -> float:
    """``‖a - b‖ / ‖b‖``, L2 over the compared entries of ``b`` (:func:`is_compared`) as one vector.

    Computed in float64. Returns 0 when both are equal, ``inf`` when ``b`` is zero and ``a`` is not.
    """
    diff = ref = 0.0
    for name, value in b.items():
        if not is_compared(name, value):
            continue
        vb = value.astype(np.float64)
        diff += float(np.sum((np.asarray(a[name], dtype=np.float64) - vb) ** 2))
        ref += float(np.sum(vb**2))
    if diff == 0.0:
        return 0.0
    return float(np.sqrt(diff / ref)) if ref > 0 else float("inf")


def predicted_distance(online: State, global_online: State, site_factor: float) -> float:
    """DP's upload criterion ``d_k = (1 - μ_k) · ‖θ_k - θ_global‖ / ‖θ_global‖``.

    Args:
        online: the site's online weights θ_k after local training.
        global_online: the global online weights θ_global the round started from, restricted
            to the target's keys (the distance is taken over these).
        site_factor: μ_k = m ** n_k for the site's n_k local steps this round.
    """
    return (1.0 - site_factor) * relative_distance(online, global_online)


def should_upload(distance: float, delta: float, round_num: int, sync_every: int) -> bool:
    """DP's upload rule: ``distance > δ``, or round ``round_num`` (0-based) is a T-th round."""
    return distance > delta or (round_num + 1) % sync_every == 0


def needs_correction(gap: float, delta: float) -> bool:
    """DP's download rule: send the server's target when it lies more than δ from the prediction."""
    return gap > delta


def fold_targets(
    previous: State,
    uploaded: Mapping[str, State],
    online: Mapping[str, State],
    factors: Mapping[str, float],
    num_samples: Mapping[str, int],
) -> tuple[dict[str, np.ndarray], float]:
    """The server's running target after a round, and the round's μ.

    Args:
        previous: the running target ξ_srv before the round.
        uploaded: site -> the target ξ_k it uploaded (sites that did not upload are absent).
        online: site -> its uploaded online weights θ_k (holding the target's keys).
        factors: site -> μ_k = m ** n_k.
        num_samples: site -> aggregation weight (samples seen), as for the weights.

    Returns:
        ``(ξ_srv', μ)``: ``ξ_srv' = Σ_k w_k ξ̂_k`` with ``ξ̂_k = ξ_k`` for uploaders and
        ``predict_target(previous, θ_k, μ_k)`` for the others; ``μ = Σ_k w_k μ_k``;
        ``w_k`` are ``num_samples`` normalised (as :func:`~fedcontrast.methods.base.weighted_average`).
    """
    estimates = {}
    for site, factor in factors.items():
        target = uploaded[site] if site in uploaded else predict_target(previous, online[site], factor)
        message = {**pack("target", target), **pack("stats", {EMA_FACTOR_ENTRY: np.float64(factor)})}
        estimates[site] = SiteUpdate(message=message, num_samples=num_samples[site])
    running = select(weighted_average(estimates, "target"), "target")
    factor = float(select(weighted_average(estimates, "stats"), "stats")[EMA_FACTOR_ENTRY])
    return running, factor


def target_part(state: State, target_keys: State) -> dict[str, np.ndarray]:
    """The entries of ``state`` named like those of ``target_keys`` (e.g. θ's encoder and head)."""
    return {name: np.asarray(state[name]) for name in target_keys}


class TargetSync(ServerStrategy):
    """FedAvg of the online weights plus the target synchronisation of ``config["target_update"]``.

    Cooperative: combine it with another strategy by inheritance (e.g. ``class S(TargetSync,
    FeatureExchange)``) and both messages are merged.

    Server state: ``global_message`` holds the averaged online weights (``weights/``) and the
    server's target (``target/``: the average of the sites' targets under ``"average"``, the
    running target ξ_srv otherwise). Under PTNU/DP the server also tracks :attr:`site_target`
    (bit-identical to what every site holds) and logs one dict per round in :attr:`sync_log`:
    ``round``, ``ema_factor`` (μ), ``target_gap`` (‖ξ_srv - ξ_pred‖ / ‖ξ_srv‖; under ``"ptnu"``
    with ``ptnu_upload`` ξ_srv is the exact average of the sites' real targets, without it the
    gap is NaN), ``uploads`` (sites that uploaded a
    target) and ``correction`` (whether the next round sends ``target/``).

    Args:
        config: merged over :attr:`DEFAULTS`.
        initial: round-0 message with ``weights/`` and ``target/`` entries.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = SYNC_DEFAULTS

    def __init__(self, config: Mapping[str, Any], initial: Message):
        super().__init__(merge_config(self.DEFAULTS, config), initial)
        check_sync_config(self.config)
        self.mode: str = self.config["target_update"]
        # the sites hold what the wire delivers: track their target from the same values
        self.transfer = transfer_precision(self.config)
        self.site_target: dict[str, np.ndarray] = select(round_trip(initial, self.transfer), "target")
        if not self.site_target:
            raise ValueError("the initial message of a target-network method must hold target/ entries")
        self.factor: float | None = None
        self.correction = False
        self.sync_log: list[dict[str, Any]] = []

    def message_for(self, site: str, round_num: int) -> Message:
        """Online weights; plus ``target/`` under ``"average"`` or after a DP correction; plus μ."""
        message = super().message_for(site, round_num)
        if self.mode == "average" or self.correction:
            message.update(pack("target", self.site_target))
        if self.mode != "average" and self.factor is not None:
            message.update(pack("stats", {EMA_FACTOR_ENTRY: np.float64(self.factor)}))
        return message

    def aggregate(self, updates: Mapping[str, SiteUpdate], round_num: int) -> None:
        """Average the online weights; average (``"average"``) or fold and predict the target."""
        super().aggregate(updates, round_num)
        if self.mode == "average":
            self.global_message.update(weighted_average(updates, "target"))
            self.site_target = select(self.global_message, "target")
            return
        momentum = float(self.config["momentum"])
        factors = {
            s: ema_factor(momentum, int(select(u.message, "stats")[STEPS_ENTRY])) for s, u in updates.items()
        }
        uploaded = {s: t for s, u in updates.items() if (t := select(u.message, "target"))}
        online = {s: target_part(select(u.message, "weights"), self.site_target) for s, u in updates.items()}
        running, self.factor = fold_targets(
            select(self.global_message, "target"),
            uploaded,
            online,
            factors,
            {s: u.num_samples for s, u in updates.items()},
        )
        received = round_trip(self.global_weights(), self.transfer)  # θ_global as the sites hold it
        theta = target_part(select(received, "weights"), self.site_target)
        predicted = predict_target(self.site_target, theta, self.factor)
        # under PTNU without uploads the server knows nothing the prediction does not use
        gap = relative_distance(predicted, running) if uploaded or self.mode == "ptnu_dp" else float("nan")
        self.correction = self.mode == "ptnu_dp" and needs_correction(gap, float(self.config["delta"]))
        if self.correction:
            self.site_target = select(round_trip(pack("target", running), self.transfer), "target")
        else:
            self.site_target = predicted
        self.global_message.update(pack("target", running))
        self.sync_log.append(
            {
                "round": round_num,
                "ema_factor": self.factor,
                "target_gap": gap,
                "uploads": sorted(uploaded),
                "correction": self.correction,
            }
        )

    def round_metrics(self, round_num: int) -> dict[str, float]:
        """The round's PTNU/DP bookkeeping: EMA factor, prediction gap, target uploads, correction."""
        entry = next((e for e in reversed(self.sync_log) if e["round"] == round_num), None)
        if entry is None:
            return {}
        metrics = {
            "ema_factor": float(entry["ema_factor"]),
            "target_gap": float(entry["target_gap"]),
            "target_uploads": float(len(entry["uploads"])),
            "target_correction": float(entry["correction"]),
        }
        if math.isnan(metrics["target_gap"]):  # not measured (PTNU without uploads)
            del metrics["target_gap"]
        return metrics
