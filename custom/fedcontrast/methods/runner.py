"""Run a method's protocol in one process, without NVFlare.

The same :class:`~fedcontrast.methods.base.SiteTrainer` and
:class:`~fedcontrast.methods.base.ServerStrategy` that the NVFlare executor and
controller drive are called here directly. Two uses:

- ``federated=False``: each site trains alone (local fine-tuning, local
  contrastive learning); nothing is exchanged, each site keeps its own model;
- ``federated=True``: the reference against which the benchmark measures the
  cost of the federation layer (same steps, no messaging).

Federated messages go through what the wire does to them: with a reduced ``transfer``
precision (:mod:`fedcontrast.methods.transfer`) every message is encoded, counted as encoded,
and decoded by its receiver, as the NVFlare quantisation filters do. A ``site_filter`` acts
on every site's upload before it is encoded, counted and handed to the server, where the
NVFlare site-side result filters act (e.g. :class:`~fedcontrast.methods.privacy.FeaturePrivacy`,
the feature privacy filter's transform).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedcontrast.methods.base import Message, SiteUpdate, count_bytes
from fedcontrast.methods.checkpoint import (
    SERVER_STATE_FILE,
    load_server_state,
    load_site_state,
    save_server_state,
    save_site_state,
)
from fedcontrast.methods.privacy import SiteFilter
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.transfer import decode, encode, transfer_precision

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Outcome of :func:`run_in_process`.

    Attributes:
        encoders: site -> encoder state dict at the end (one shared encoder when federated).
        global_message: the server's final global message (federated runs), else empty.
        final_messages: site -> the last message each site uploaded.
        history: one dict per (round, site): metrics, bytes by kind and direction, seconds.
        server_metrics: one dict per round of the strategy's :meth:`ServerStrategy.round_metrics`.
        wall_s: total wall-clock seconds.
    """

    encoders: dict[str, dict[str, torch.Tensor]]
    global_message: Message
    final_messages: dict[str, Message]
    history: list[dict[str, Any]] = field(default_factory=list)
    server_metrics: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0


def run_in_process(
    method: str,
    config: Mapping[str, Any],
    datalists: Mapping[str, list[dict]],
    rounds: int,
    federated: bool = True,
    device: str = "cpu",
    on_round: Callable[[int, dict[str, SiteUpdate], Message], None] | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    site_filter: SiteFilter | None = None,
) -> RunResult:
    """Run ``rounds`` rounds of ``method`` over ``datalists`` in this process.

    Args:
        method: registered method name.
        config: method configuration (merged over the method's defaults by the trainer).
        datalists: site name -> that site's datalist entries.
        rounds: number of rounds (each = ``config["local_epochs"]`` local epochs).
        federated: exchange through the method's server strategy; False trains every site alone.
        device: torch device for every site.
        on_round: called after every round with the round number, the sites' updates and the
            server's new global message (empty when not federated).
        state_dir: keep the server's and every site's state there after each round
            (:mod:`fedcontrast.methods.checkpoint`; sites in ``<state_dir>/<site>/``).
        resume: continue from the state in ``state_dir`` (the rounds it completed are not run
            again; ``history`` holds the new rounds only).
        site_filter: ``site_filter(site, round_num, message)`` is what leaves ``site`` instead of
            its trainer's upload (federated runs: the server, the ledger and, through the server,
            the other sites see only its output; the trainer's own state is untouched). Nothing
            leaves a site that is not federated, so there it is not applied.
    """
    if not datalists:
        raise ValueError("no sites to train: the datalists mapping is empty")
    spec = get_method(method)
    precision = transfer_precision(config)
    start = time.perf_counter()
    initial = spec.trainer.initial_message(config)
    trainers = {site: spec.trainer(config, entries, site, device) for site, entries in datalists.items()}
    strategy = spec.strategy(config, initial) if federated and spec.federated else None
    own: dict[str, Message] = {site: dict(initial) for site in trainers}
    history: list[dict[str, Any]] = []
    server_metrics: list[dict[str, float]] = []
    first = 0
    if resume:
        if state_dir is None:
            raise ValueError("resume needs the state_dir of the stopped run")
        saved = load_server_state(Path(state_dir) / SERVER_STATE_FILE, method)
        first, strategy, own = saved["next_round"], saved["strategy"], saved["own"]
        for site, trainer in trainers.items():
            if not load_site_state(Path(state_dir) / site, trainer, first):
                raise ValueError(f"{site}: no state before round {first} in {Path(state_dir) / site}")
    for round_num in range(first, rounds):
        updates: dict[str, SiteUpdate] = {}
        for site, trainer in trainers.items():
            outgoing = strategy.message_for(site, round_num) if strategy else own[site]
            sent_down = encode(outgoing, precision) if strategy else outgoing
            t0 = time.perf_counter()
            update = trainer.local_round(decode(sent_down) if strategy else outgoing, round_num)
            if state_dir is not None:
                save_site_state(Path(state_dir) / site, trainer, round_num + 1)
            leaving = update.message
            if strategy and site_filter:  # where the site's NVFlare result filters act
                leaving = site_filter(site, round_num, leaving)
            sent_up = encode(leaving, precision) if strategy else leaving
            if strategy:  # the server holds what arrives (networks decoded from the wire precision)
                update = SiteUpdate(decode(sent_up), update.num_samples, update.metrics)
            updates[site] = update
            own[site] = update.message
            history.append(
                {
                    "round": round_num,
                    "site": site,
                    "metrics": dict(update.metrics),
                    "bytes_down": count_bytes(sent_down) if strategy else {},
                    "bytes_up": count_bytes(sent_up) if strategy else {},
                    "seconds": time.perf_counter() - t0,
                }
            )
            logger.info("round %d %s %s", round_num, site, update.metrics)
        if strategy:
            strategy.aggregate(updates, round_num)
            server_metrics.append({"round": round_num, **strategy.round_metrics(round_num)})
        if state_dir is not None:
            save_server_state(
                Path(state_dir) / SERVER_STATE_FILE, method, round_num + 1, strategy=strategy, own=own
            )
        if on_round:
            on_round(round_num, updates, strategy.global_message if strategy else {})
    return RunResult(
        encoders={site: t.encoder_state_dict() for site, t in trainers.items()},
        global_message=dict(strategy.global_message) if strategy else {},
        final_messages=own,
        history=history,
        server_metrics=server_metrics,
        wall_s=time.perf_counter() - start,
    )
