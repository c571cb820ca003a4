"""``MethodController``: runs any registered method's :class:`~fedcontrast.methods.base.ServerStrategy`.

Each round, every site gets ``strategy.message_for(site, round)`` as its own task
(so each site can receive a different payload, e.g. only the *other* sites'
features), the controller waits until no task is standing, then calls
``strategy.aggregate(updates, round)``: the protocol of
:func:`fedcontrast.methods.runner.run_in_process`, over NVFlare. With
``federated=False`` (or a method registered as not federated) nothing is
averaged: each site gets back its own last upload, so each site trains alone
(local fine-tuning, local contrastive learning) through the same job.

Results, in the server's result folder (the job's run folder unless the site
configured a result root; in the simulator ``<workspace>/server/simulate_job/``),
all updated after every round:

- ``bytes.json``, ``metrics.json``, ``tensorboard/`` (see :mod:`fedcontrast.flare.ledger`);
  ``metrics.json`` holds, for the site ``"server"``, every round's timing (:func:`round_timing`)
  and the strategy's own round metrics;
- federated runs: ``global_model.pt``, the global ``weights/`` entries as a plain state
  dict of the bundle network, written when they cover the whole network (the bundle's
  ``evaluate``/``inference`` load it with ``--ckpt_path``), and ``model_bundle/``, a copy of
  the bundle that runs it by itself (its configs hold the job's ``bundle`` overrides, its
  ``metadata.json`` names the label set's output channels); for a pre-training method
  ``pretrained_encoder.pt``, the ``weights/encoder.*`` entries with ``encoder.`` stripped, with
  the voxel grid and network options they fit (the bundle's ``scripts/encoder.py`` format; the
  bundle's and ``jobs/finetune``'s ``pretrained_encoder`` option loads it);
- methods whose trainer defines a ``save_checkpoint(weights, out_dir, config, site)`` class
  method write their own files too (``local_decoder``: ``pretrained_decoder.pt``, the
  decoder-stage checkpoint; ``site`` is None for the global model);
- local runs: the same files per site under ``local/<site>/``;
- with ``record_messages``: every message as sent, ``messages/r<round>_<site>_<down|up>.npz``
  (an audit of what left each site; uploads are recorded after the sites' result filters).

A site whose task fails stops the run: the server log names the site (NVFlare's
"Result from <site> is bad"), and the site's log says why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedcontrast.flare.ledger import RunLedger
from fedcontrast.flare.messages import TRAIN_SECONDS, flmodel_to_update, message_to_flmodel
from fedcontrast.methods.base import Message, SiteUpdate, message_to_state_dict
from fedcontrast.methods.local_decoder import DECODER_FILE  # noqa: F401  (re-exported: the decoder-stage file)
from fedcontrast.methods.registry import MethodSpec, get_method
from fedcontrast.methods.transfer import transfer_precision
from fedcontrast.nets.bundle import build_network, encoder_options, export_bundle, save_encoder

MODEL_FILE = "global_model.pt"
#: The bundle that runs ``MODEL_FILE`` by itself (:func:`~fedcontrast.nets.bundle.export_bundle`).
MODEL_BUNDLE_DIR = "model_bundle"
ENCODER_FILE = "pretrained_encoder.pt"
LOCAL_DIR = "local"
MESSAGES_DIR = "messages"
#: Seconds between the server's checks for finished tasks (see :class:`MethodController`).
TASK_CHECK_PERIOD = 0.05


def round_timing(round_s: float, train_seconds: dict[str, float]) -> dict[str, float]:
    """The server's timing metrics of one round.

    Args:
        round_s: seconds from sending the round's tasks until every site's update was in.
        train_seconds: site -> seconds its ``local_round`` took (the executor's ``meta``).

    Returns:
        ``round_s``, ``site_train_s`` (the slowest site's training) and ``overhead_s``
        (their difference: what the federation layer added to the round: task pick-up,
        serialisation, filters, result upload and the server's checks).
    """
    slowest = max(train_seconds.values(), default=float("nan"))
    return {"round_s": round_s, "site_train_s": slowest, "overhead_s": round_s - slowest}


def save_models(weights: Message, out_dir: Path, config: dict[str, Any], pretraining: bool) -> list[Path]:
    """Write the network and encoder files of a final ``weights`` message (see the module docstring).

    Returns:
        The files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = message_to_state_dict(weights, "weights")
    bundle_dir, overrides = config.get("bundle_dir"), config.get("bundle", {})
    network_keys = build_network(bundle_dir, overrides).state_dict().keys()
    written = []
    if network_keys <= state.keys():
        torch.save({k: state[k] for k in network_keys}, out_dir / MODEL_FILE)
        written.append(out_dir / MODEL_FILE)
        written.append(export_bundle(out_dir / MODEL_FILE, out_dir / MODEL_BUNDLE_DIR, overrides, bundle_dir))
    if pretraining:
        prefix = "encoder."
        encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not encoder:
            raise ValueError("a pre-training method's weights hold no 'encoder.*' entry")
        save_encoder(encoder, out_dir / ENCODER_FILE, encoder_options(bundle_dir, overrides), bundle_dir)
        written.append(out_dir / ENCODER_FILE)
    return written


def save_outputs(
    spec: MethodSpec, weights: Message, out_dir: Path, config: dict[str, Any], site: str | None
) -> list[Path]:
    """:func:`save_models`, plus the method's own files when its trainer has ``save_checkpoint``.

    Args:
        spec: the registered method.
        weights: the final weights (global message, or a site's own last upload).
        out_dir: where to write.
        config: the method's configuration.
        site: the site of a local run's model; None for the global model.
    """
    written = save_models(weights, out_dir, config, spec.pretraining)
    saver = getattr(spec.trainer, "save_checkpoint", None)
    if saver is not None:
        written += saver(weights, out_dir, config, site)
    return written


class MethodController(ModelController):
    """Server workflow of any registered method (see the module docstring).

    Args:
        method: registered method name.
        config: the method's configuration (the same dict the sites get).
        num_rounds: rounds to run.
        min_clients: fewest sites to start with.
        task_name: the task sent every round (the name the executor and filters are bound to).
        federated: False: no aggregation, each site gets back its own last upload.
        task_timeout: seconds a site may take for one round (0: no limit).
        record_messages: also save every message sent and received (an audit; costs disk).
        task_check_period: seconds between the server's checks for finished tasks (NVFlare's
            default is 0.5; every round waits up to two such periods, so it is kept short).
    """

    def __init__(
        self,
        method: str,
        config: dict | None = None,
        num_rounds: int = 1,
        min_clients: int = 1,
        task_name: str = "train",
        federated: bool = True,
        task_timeout: int = 0,
        record_messages: bool = False,
        task_check_period: float = TASK_CHECK_PERIOD,
    ):
        # no persistor: the strategy holds the global state; one failed site stops the run
        super().__init__(persistor_id="", ignore_result_error=False, task_check_period=task_check_period)
        self.method = method
        self.config = dict(config or {})
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.task_name = task_name
        self.federated = federated
        self.task_timeout = task_timeout
        self.record_messages = record_messages
        self.task_check_period = task_check_period
        self._train_seconds: dict[str, float] = {}

    def result_dir(self) -> Path:
        """The server's result folder for this job."""
        return Path(self.engine.get_workspace().get_result_root(self.fl_ctx.get_job_id()))

    def run(self) -> None:
        """All rounds, then the final models."""
        spec = get_method(self.method)
        sites = sorted(self.sample_clients())
        if len(sites) < self.min_clients:
            self.panic(f"{len(sites)} site(s) {sites} joined; the job needs at least {self.min_clients}")
            return
        initial = spec.trainer.initial_message(self.config)
        strategy = spec.strategy(self.config, initial) if self.federated and spec.federated else None
        own: dict[str, Message] = {site: dict(initial) for site in sites}
        out_dir = self.result_dir()
        ledger = RunLedger(out_dir, transfer=transfer_precision(self.config))
        self.info(f"{self.method}: {self.num_rounds} round(s) on {sites}, federated={strategy is not None}")
        try:
            for round_num in range(self.num_rounds):
                messages = {s: strategy.message_for(s, round_num) if strategy else own[s] for s in sites}
                start = time.perf_counter()
                updates = self.run_round(round_num, messages, ledger)
                if updates is None:
                    return
                timing = round_timing(time.perf_counter() - start, self._train_seconds)
                if strategy:
                    strategy.aggregate(updates, round_num)
                    timing |= strategy.round_metrics(round_num)
                ledger.record_metrics(round_num, "server", timing, 0)
                if not strategy:
                    own.update({s: u.message for s, u in updates.items()})
                ledger.end_round(round_num)
        finally:
            ledger.close()
        if strategy:
            written = save_outputs(spec, strategy.global_weights(), out_dir, self.config, None)
        else:
            written = [
                path
                for site in sites
                for path in save_outputs(spec, own[site], out_dir / LOCAL_DIR / site, self.config, site)
            ]
        self.info(f"{self.method}: done; wrote {[str(p) for p in written]} and the ledger in {out_dir}")

    def run_round(
        self, round_num: int, messages: dict[str, Message], ledger: RunLedger
    ) -> dict[str, SiteUpdate] | None:
        """Send each site its message as its own task, wait for all; None when the run was stopped."""
        updates: dict[str, SiteUpdate] = {}
        self._train_seconds = {}

        def collect(result: FLModel) -> None:
            site = result.meta["client_name"]
            updates[site] = flmodel_to_update(result)
            self._train_seconds[site] = float(result.meta.get(TRAIN_SECONDS, float("nan")))

        for site, message in messages.items():
            ledger.record_message(round_num, site, "down", message)
            self.send_model(
                task_name=self.task_name,
                data=message_to_flmodel(message, round_num, self.num_rounds),
                targets=[site],
                timeout=self.task_timeout,
                callback=collect,
            )
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return None
            time.sleep(self._task_check_period)
        if self.abort_signal.triggered:
            return None
        missing = [site for site in messages if site not in updates]
        if missing:
            self.panic(f"round {round_num}: no update from {missing}; their logs say why")
            return None
        for site in messages:
            update = updates[site]
            ledger.record_message(round_num, site, "up", update.message)
            ledger.record_metrics(round_num, site, update.metrics, update.num_samples)
            self.info(f"round {round_num} {site}: {update.num_samples} samples, {update.metrics}")
            if self.record_messages:
                folder = self.result_dir() / MESSAGES_DIR
                folder.mkdir(exist_ok=True)
                np.savez(folder / f"r{round_num}_{site}_down.npz", **messages[site])
                np.savez(folder / f"r{round_num}_{site}_up.npz", **update.message)
        return updates
