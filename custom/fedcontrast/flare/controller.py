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
  dict of the bundle network, written when they cover the whole network with its shapes and the
  method's outputs are the label set's classes (not a pretext's, ``label_outputs``; the bundle's
  ``evaluate``/``inference`` load it with ``--ckpt_path``), and ``model_bundle/``, a copy of
  the bundle that runs it by itself (its configs hold the job's ``bundle`` overrides, its
  ``metadata.json`` names the label set's output channels); for a pre-training method
  ``pretrained_encoder.pt``, the ``weights/encoder.*`` entries with ``encoder.`` stripped, with
  the voxel grid and network options they fit (the bundle's ``scripts/encoder.py`` format; the
  bundle's and ``jobs/finetune``'s ``pretrained_encoder`` option loads it);
- methods whose trainer defines a ``save_checkpoint(weights, out_dir, config, site)`` class
  method write their own files too (``local_decoder``, and the whole-network pretexts
  ``fedrestore``, ``fedpseudoseg`` and ``fedmotion`` with ``decoder_handover``:
  ``pretrained_decoder.pt``, the decoder-stage checkpoint; ``site`` is None for the global model);
- local runs: the same files per site under ``local/<site>/``;
- with ``record_messages``: every message as sent, ``messages/r<round>_<site>_<down|up>.npz``
  (an audit of what left each site; uploads are recorded after the sites' result filters).

Faults (docs/deployment.md, "Failures and recovery"). Every update is checked on arrival
against the method's outbound schema (:mod:`fedcontrast.methods.outbound`: expected keys,
shapes and dtypes, finite values). A site is *left out* of a round when its task failed, its
update was refused, or it did not answer within ``task_timeout``; a site that did not answer
at all is also left out of the later rounds. A round is aggregated over the sites that
answered when at least ``min_responses`` did (``0``: every site), and the server log names
the sites left out and why; otherwise the run stops at once, naming them. A refused update
stops the run unless ``exclude_bad_updates``. The first round this run sends (round 0, or the
round a resumed run starts at) may be given a longer limit, ``first_round_timeout``: it also
pays each site's start-up (its job process, its data). ``run_status.json`` (the result folder)
says ``running``, ``finished`` or ``aborted`` with the reason and the sites left out by round,
so whatever launched the run knows when it is over. A run that stops after at least one
aggregated round still delivers the last good model: the files of a finished run, written from
the global weights of the last complete round (``model_round`` in ``run_status.json``; a run
aborted from outside, e.g. by the admin, writes none). ``server_state.pkl``
(:mod:`fedcontrast.methods.checkpoint`), written atomically after every round, lets
``resume_from`` continue a stopped run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedcontrast.data.io import write_json
from fedcontrast.flare.ledger import RunLedger
from fedcontrast.flare.messages import TRAIN_SECONDS, flmodel_to_update, message_to_flmodel
from fedcontrast.flare.process_group import STATUS_FILE
from fedcontrast.methods.base import Message, SiteUpdate, message_to_state_dict
from fedcontrast.methods.checkpoint import SERVER_STATE_FILE, load_server_state, save_server_state
from fedcontrast.methods.local_decoder import DECODER_FILE  # noqa: F401  (re-exported: the decoder-stage file)
from fedcontrast.methods.outbound import OutboundSchema
from fedcontrast.methods.registry import MethodSpec, get_method
from fedcontrast.methods.transfer import transfer_precision
from fedcontrast.nets.bundle import build_network, encoder_options, encoder_state, export_bundle, save_encoder

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


def save_models(
    weights: Message, out_dir: Path, config: dict[str, Any], pretraining: bool, label_outputs: bool = True
) -> list[Path]:
    """Write the network and encoder files of a final ``weights`` message (see the module docstring).

    ``label_outputs`` False (a pretext's whole network, :class:`~fedcontrast.methods.registry.MethodSpec`)
    writes no segmentation model, whatever the shapes.

    Returns:
        The files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = message_to_state_dict(weights, "weights")
    bundle_dir, overrides = config.get("bundle_dir"), config.get("bundle", {})
    network = build_network(bundle_dir, overrides).state_dict()
    written = []
    # the whole segmentation network, shapes included (a bundle override may change them)
    if label_outputs and all(k in state and state[k].shape == v.shape for k, v in network.items()):
        torch.save({k: state[k] for k in network}, out_dir / MODEL_FILE)
        written.append(out_dir / MODEL_FILE)
        written.append(export_bundle(out_dir / MODEL_FILE, out_dir / MODEL_BUNDLE_DIR, overrides, bundle_dir))
    if pretraining:
        options = encoder_options(bundle_dir, overrides)
        save_encoder(encoder_state(state), out_dir / ENCODER_FILE, options, bundle_dir)
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
    written = save_models(weights, out_dir, config, spec.pretraining, spec.label_outputs)
    saver = getattr(spec.trainer, "save_checkpoint", None)
    if saver is not None:
        written += saver(weights, out_dir, config, site)
    return written


def sort_updates(
    sites: Iterable[str],
    received: Mapping[str, SiteUpdate],
    failed: Mapping[str, str],
    schema: OutboundSchema,
    min_responses: int = 0,
    exclude_bad_updates: bool = False,
    silent_detail: str = "before the task ended",
) -> tuple[dict[str, SiteUpdate], dict[str, str], str]:
    """Which updates of a round are used, which sites are left out and why, and whether to stop.

    Args:
        sites: the sites the round was sent to.
        received: the updates that arrived, by site.
        failed: sites whose task failed, with NVFlare's return code.
        schema: the method's outbound schema (every update is checked against it).
        min_responses: fewest usable updates the round needs (0: every site).
        exclude_bad_updates: leave a refused update out instead of stopping.
        silent_detail: how long a silent site was waited for, for the message.

    Returns:
        ``(updates, left_out, reason)``: ``reason`` is "" to go on, else why the run must stop
        (naming the sites).
    """
    sites = list(sites)
    left_out: dict[str, str] = {}
    for site in sites:
        if site in failed:
            left_out[site] = f"failed ({failed[site]}; its local log says why)"
        elif site not in received:
            left_out[site] = f"silent (no answer {silent_detail})"
        else:
            try:
                schema.check(received[site].message)
            except ValueError as exc:
                if not exclude_bad_updates:
                    return {}, {}, f"{site}: update refused: {exc}"
                left_out[site] = f"update refused: {exc}"
    updates = {s: received[s] for s in sites if s not in left_out}
    needed = min_responses if min_responses > 0 else len(sites)
    if len(updates) < needed:
        named = "; ".join(f"{s}: {why}" for s, why in left_out.items())
        return (
            {},
            left_out,
            f"{len(updates)} of {len(sites)} site(s) answered, {needed} needed; left out: {named}",
        )
    return updates, left_out, ""


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
        min_responses: fewest sites whose updates a round needs (0: every site).
        exclude_bad_updates: leave a site whose update is refused out of the round (when
            ``min_responses`` still holds) instead of stopping the run.
        resume_from: a server state file (``server_state.pkl`` of a stopped run of this
            method): continue after its last complete round ("": start at round 0).
        first_round_timeout: seconds a site may take for the first round this run sends, its
            start-up included (0: ``task_timeout``).
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
        min_responses: int = 0,
        exclude_bad_updates: bool = False,
        resume_from: str = "",
        first_round_timeout: int = 0,
    ):
        # no persistor: the strategy holds the global state; failed sites are handled in run_round
        super().__init__(persistor_id="", ignore_result_error=True, task_check_period=task_check_period)
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
        self.min_responses = min_responses
        self.exclude_bad_updates = exclude_bad_updates
        self.resume_from = resume_from
        self.first_round_timeout = first_round_timeout
        self._failed: dict[str, str] = {}
        self.schema: OutboundSchema | None = None

    def result_dir(self) -> Path:
        """The server's result folder for this job."""
        return Path(self.engine.get_workspace().get_result_root(self.fl_ctx.get_job_id()))

    def write_status(self, status: str, round_num: int, **details: Any) -> None:
        """``run_status.json``: ``{"status", "round", ...}`` (running, finished or aborted)."""
        write_json(self.result_dir() / STATUS_FILE, {"status": status, "round": round_num, **details})

    def stop(self, round_num: int, reason: str, **details: Any) -> None:
        """End the run now: status ``aborted`` with ``reason`` (and ``details``), then NVFlare's
        panic (the log says why)."""
        self.write_status("aborted", round_num, reason=reason, **details)
        self.panic(reason)

    def _accept_train_result(
        self, client_name: str, result: Any, fl_ctx: Any, is_unknown_task: bool = False
    ) -> bool:
        """NVFlare's check of a result's return code; a failed site is remembered for :meth:`run_round`."""
        code = result.get_return_code()
        if not is_unknown_task and code and code != "OK":
            self._failed[client_name] = str(code)
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def run(self) -> None:
        """All rounds, then the final models (also, after a stop, the last complete round's)."""
        spec = get_method(self.method)
        sites = sorted(self.sample_clients())
        if len(sites) < self.min_clients:
            self.stop(0, f"{len(sites)} site(s) {sites} joined; the job needs at least {self.min_clients}")
            return
        initial = spec.trainer.initial_message(self.config)
        self.schema = spec.trainer.outbound_schema(self.config)
        strategy = spec.strategy(self.config, initial) if self.federated and spec.federated else None
        own: dict[str, Message] = {site: dict(initial) for site in sites}
        out_dir = self.result_dir()
        ledger = RunLedger(out_dir, transfer=transfer_precision(self.config))
        self.info(f"{self.method}: {self.num_rounds} round(s) on {sites}, federated={strategy is not None}")
        left_out: dict[str, dict[str, str]] = {}
        first = 0
        if self.resume_from:
            try:
                saved = load_server_state(self.resume_from, self.method)
            except ValueError as exc:
                self.stop(0, f"cannot resume: {exc}")
                return
            first, strategy, own, left_out = (
                saved["next_round"],
                saved["strategy"],
                saved["own"],
                saved["left_out"],
            )
            sites = [s for s in saved["sites"] if s in sites]
            ledger.bytes, ledger.metrics = saved["ledger"]["bytes"], saved["ledger"]["metrics"]
            self.info(f"{self.method}: resuming at round {first} from {self.resume_from} on {sites}")
        self.write_status("running", first)

        def last_good_model(round_num: int) -> dict[str, Any]:
            """The models of the rounds before ``round_num`` (none before the first aggregated one)."""
            if round_num == 0:
                return {}
            try:
                written = self.save_final(spec, strategy, own)
            except Exception as exc:  # the stop must still happen; its reason matters more
                self.error(f"round {round_num}: cannot write the last good model: {exc}")
                return {}
            self.info(f"wrote the model of round {round_num - 1}: {[str(p) for p in written]}")
            return {"model_round": round_num - 1, "files": [p.name for p in written]}

        try:
            for round_num in range(first, self.num_rounds):
                messages = {s: strategy.message_for(s, round_num) if strategy else own[s] for s in sites}
                start = time.perf_counter()
                timeout = self.first_round_timeout if round_num == first else 0
                updates, missing, reason = self.run_round(
                    round_num, messages, ledger, timeout or self.task_timeout
                )
                if missing:
                    left_out[str(round_num)] = missing
                if updates is None:  # aborted from outside (the admin, NVFlare): no reason to add
                    self.write_status("aborted", round_num, reason=reason, left_out=left_out)
                    return
                if reason:
                    self.stop(
                        round_num,
                        f"round {round_num}: {reason}",
                        left_out=left_out,
                        **last_good_model(round_num),
                    )
                    return
                timing = round_timing(time.perf_counter() - start, self._train_seconds)
                if missing:
                    # a site that did not answer at all is not waited for again
                    sites = [s for s in sites if not missing.get(s, "").startswith("silent")]
                if strategy:
                    strategy.aggregate(updates, round_num)
                    timing |= strategy.round_metrics(round_num)
                ledger.record_metrics(round_num, "server", timing, 0)
                if not strategy:
                    own.update({s: u.message for s, u in updates.items()})
                ledger.end_round(round_num)
                try:
                    save_server_state(
                        out_dir / SERVER_STATE_FILE,
                        self.method,
                        round_num + 1,
                        strategy=strategy,
                        own=own,
                        sites=sites,
                        left_out=left_out,
                        ledger={"bytes": ledger.bytes, "metrics": ledger.metrics},
                    )
                except Exception as exc:  # the run goes on; only a resume would need it
                    self.warning(f"round {round_num}: cannot save the server state for a resume: {exc}")
                self.write_status("running", round_num + 1, left_out=left_out)
        finally:
            ledger.close()
        written = self.save_final(spec, strategy, own)
        self.write_status("finished", self.num_rounds, left_out=left_out, files=[p.name for p in written])
        self.info(f"{self.method}: done; wrote {[str(p) for p in written]} and the ledger in {out_dir}")

    def save_final(self, spec: MethodSpec, strategy: Any, own: dict[str, Message]) -> list[Path]:
        """The run's models as they stand: the global model, or (no strategy) each site's own."""
        out_dir = self.result_dir()
        if strategy:
            return save_outputs(spec, strategy.global_weights(), out_dir, self.config, None)
        return [
            path
            for site in own
            for path in save_outputs(spec, own[site], out_dir / LOCAL_DIR / site, self.config, site)
        ]

    def run_round(
        self, round_num: int, messages: dict[str, Message], ledger: RunLedger, timeout: int = 0
    ) -> tuple[dict[str, SiteUpdate] | None, dict[str, str], str]:
        """Send each site its message as its own task and wait for them.

        Args:
            round_num: the round.
            messages: each site's message.
            ledger: the run's ledger (the messages are recorded in it).
            timeout: seconds each site may take (0: no limit).

        Returns:
            ``(updates, left_out, reason)``: the usable updates by site, why each other site was
            left out, and "" or why the run must stop; ``updates`` is None when the run was
            aborted from outside.
        """
        received: dict[str, SiteUpdate] = {}
        self._failed = {}
        self._train_seconds = {}

        def collect(result: FLModel) -> None:
            site = result.meta["client_name"]
            received[site] = flmodel_to_update(result)
            self._train_seconds[site] = float(result.meta.get(TRAIN_SECONDS, float("nan")))

        for site, message in messages.items():
            ledger.record_message(round_num, site, "down", message)
            self.send_model(
                task_name=self.task_name,
                data=message_to_flmodel(message, round_num, self.num_rounds),
                targets=[site],
                timeout=timeout,
                callback=collect,
            )
        while self.get_num_standing_tasks() and not self.abort_signal.triggered:
            time.sleep(self._task_check_period)
        if self.abort_signal.triggered:
            return None, {}, "aborted"
        waited = f"within {timeout} s" if timeout else "before the task ended"
        updates, left_out, reason = sort_updates(
            messages,
            received,
            self._failed,
            self.schema,
            self.min_responses,
            self.exclude_bad_updates,
            waited,
        )
        if reason:
            return {}, left_out, reason
        if left_out:
            named = "; ".join(f"{s}: {why}" for s, why in left_out.items())
            self.warning(f"round {round_num}: aggregating {sorted(updates)}; left out: {named}")
        for site, update in updates.items():
            ledger.record_message(round_num, site, "up", update.message)
            ledger.record_metrics(round_num, site, update.metrics, update.num_samples)
            self.info(f"round {round_num} {site}: {update.num_samples} samples, {update.metrics}")
            if self.record_messages:
                folder = self.result_dir() / MESSAGES_DIR
                folder.mkdir(exist_ok=True)
                np.savez(folder / f"r{round_num}_{site}_down.npz", **messages[site])
                np.savez(folder / f"r{round_num}_{site}_up.npz", **update.message)
        return updates, left_out, ""
