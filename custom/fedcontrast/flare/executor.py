"""``MethodExecutor``: runs any registered method's :class:`~fedcontrast.methods.base.SiteTrainer` at a site.

The executor only moves tensors: it turns the task's ``FLModel`` into a
:data:`~fedcontrast.methods.base.Message`, calls ``trainer.local_round`` and
returns the site's :class:`~fedcontrast.methods.base.SiteUpdate` as an ``FLModel``
(see :mod:`fedcontrast.flare.messages`). The trainer is built on the first task,
from the site's own datalist, found in this order
(:func:`~fedcontrast.flare.site_config.resolve_datalist`):

1. the environment variable ``FEDCONTRAST_DATALIST`` (a path);
2. the site workspace's ``local/fedcontrast.json``: ``{"datalist": path}`` (relative paths
   are relative to that file);
3. the job's ``datalist`` template, ``{site}`` replaced by the site's name.

So one job folder serves every hospital: each one points at its data in its own
workspace or environment. A site whose datalist cannot be read, or that has fewer
volumes than the job needs, logs a message that names the site and the file and
returns an error, which stops the run on the server (see
:class:`~fedcontrast.flare.controller.MethodController`). The method's local outputs (the
bundle's checkpoints and TensorBoard logs while fine-tuning) go to ``fedcontrast/`` in the
site's folder of the job run, never to a temporary folder that a killed process would leave.

**What a failure sends to the server.** The details (paths, exception text, traceback) go
to the site's own ``log.txt`` only (WARNING); the ERROR line, which NVFlare streams to the
server's job store and the admin, says ``<site>: round <r>: <kind of failure> (<exception
type>)`` and nothing else (:mod:`fedcontrast.flare.log_privacy`, which also withholds other
libraries' error records from the streamed log).

**Outbound schema.** The executor puts the method's declared schema
(:meth:`~fedcontrast.methods.base.SiteTrainer.outbound_schema`) in the task's context as
:data:`OUTBOUND_SCHEMA_PROP`, where the site's own
:class:`~fedcontrast.flare.filters.OutboundPolicyFilter` reads it.

**Resume.** After every round the site keeps its trainer's restorable state (banks, momentum
and target networks, optimiser, random generators) in :meth:`MethodExecutor.state_folder`;
a trainer built for a task of round r > 0 (a resumed run) takes back the state kept before
round r.

**Fault injection (tests).** The environment variable ``FEDCONTRAST_FAULT`` of a site's
process, ``<site>:<round>:<fault>[,...]``, makes that site misbehave in that round: ``raise``
(the round fails), ``nan`` (a NaN in the upload, after the trainer's own checks), ``extra``
(an extra ``features/raw`` entry shaped like an image slice), ``hang`` (never answers), ``die``
(the site's process exits at once). Unset in a deployment.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.fl_context_utils import generate_log_message
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedcontrast.data.datalist import held_out, load_site_datalist
from fedcontrast.data.labels import common_label_set
from fedcontrast.flare.filters import OUTBOUND_SCHEMA_PROP
from fedcontrast.flare.log_privacy import SAFE, redact_error_log
from fedcontrast.flare.messages import TRAIN_SECONDS, as_message, update_to_flmodel
from fedcontrast.flare.site_config import resolve_datalist
from fedcontrast.methods.base import SiteTrainer, SiteUpdate
from fedcontrast.methods.checkpoint import load_site_state, save_site_state
from fedcontrast.methods.outbound import OutboundSchema
from fedcontrast.methods.registry import get_method
from fedcontrast.nets.bundle import bundle_parser


def site_entries(
    site: str,
    path: Path,
    keys: Sequence[str],
    validation_key: str = "",
    min_volumes: int = 1,
    labels: tuple[str, Mapping[str, int]] | None = None,
) -> list[dict]:
    """The entries a site trains on: the ``keys`` lists of its datalist, then the
    ``validation_key`` list tagged ``"split": "validation"`` (held out, measured every round).

    ``labels``: ``(where from, label set)`` of the job; the datalist must declare the same.

    Raises:
        ValueError: the datalist is unreadable or invalid, has fewer than ``min_volumes``
            entries in ``keys``, or declares another label set than ``labels`` (both named);
            the message names the site and the file.
    """
    try:
        datalist = load_site_datalist(path)
    except (ValueError, OSError) as exc:  # the message names the file
        raise ValueError(f"{site}: cannot use its datalist: {exc}") from exc
    if labels is not None:
        source, job_labels = labels
        common_label_set({source: job_labels, f"{site}'s datalist {path}": datalist["labels"]})
    entries = [dict(e) for key in keys for e in datalist.get(key, [])]
    if len(entries) < min_volumes:
        raise ValueError(
            f"{site}: the job needs at least {min_volumes} volume(s) in {list(keys)} "
            f"but {path} has {len(entries)}"
        )
    return entries + held_out(datalist.get(validation_key, []) if validation_key else [])


#: Folder of the site's job run directory for the method's local outputs.
LOCAL_OUTPUT_DIR = "fedcontrast"
#: Environment variable naming the folder where sites keep their state for a resume.
STATE_DIR_ENV = "FEDCONTRAST_STATE_DIR"
#: Environment variable of the fault injection (see the module docstring).
FAULT_ENV = "FEDCONTRAST_FAULT"
FAULTS = ("raise", "nan", "extra", "hang", "die")


def injected_fault(site: str, round_num: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """The fault ``FEDCONTRAST_FAULT`` asks of ``site`` in ``round_num`` (None: behave)."""
    for item in filter(None, environ.get(FAULT_ENV, "").split(",")):
        try:
            target, number, fault = item.strip().split(":")
            number = int(number)
        except ValueError:
            raise ValueError(f"${FAULT_ENV}: {item!r} is not <site>:<round>:<fault>") from None
        if fault not in FAULTS:
            raise ValueError(f"${FAULT_ENV}: unknown fault {fault!r}; known: {FAULTS}")
        if target == site and number == round_num:
            return fault
    return None


def corrupt(update: SiteUpdate, fault: str) -> SiteUpdate:
    """``update`` with the injected ``nan`` or ``extra`` fault (what a faulty or hostile trainer sends)."""
    message = dict(update.message)
    if fault == "nan":
        key = next(k for k, v in message.items() if np.issubdtype(v.dtype, np.floating) and v.size)
        message[key] = message[key].copy()
        message[key].flat[0] = np.nan
    elif fault == "extra":
        message["features/raw"] = np.zeros((16, 16), dtype=np.float32)  # a slice of an image
    return SiteUpdate(message, update.num_samples, update.metrics)


class MethodExecutor(Executor):
    """Runs one registered method's site trainer for every task named ``task_name``.

    Args:
        method: registered method name (:func:`~fedcontrast.methods.registry.get_method`).
        config: the method's configuration (the same dict the server's strategy gets).
        datalist: the job's datalist template, e.g. ``/data/splits/{site}.json`` (see the module docstring).
        datalist_keys: the site datalist lists the method trains on (supervised: ``training``;
            pre-training: ``training`` and ``unlabeled``).
        validation_key: a site datalist list held out for validation ("" for none).
        min_volumes: fewest entries in ``datalist_keys`` a site must have.
        task_name: the task this executor handles.
    """

    def __init__(
        self,
        method: str,
        config: dict | None = None,
        datalist: str = "",
        datalist_keys: list[str] | None = None,
        validation_key: str = "",
        min_volumes: int = 1,
        task_name: str = "train",
    ):
        super().__init__()
        # every argument under its own name: the Job API writes the config from these attributes
        self.method = method
        self.config = dict(config or {})
        self.datalist = datalist
        self.datalist_keys = list(datalist_keys or ["training"])
        self.validation_key = validation_key
        self.min_volumes = min_volumes
        self.task_name = task_name
        self.trainer: SiteTrainer | None = None
        self.schema: OutboundSchema | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Keep identifiers out of the streamed error log from the start; drop the trainer at the end."""
        if event_type == EventType.START_RUN:
            redact_error_log()
        elif event_type == EventType.END_RUN:
            self.trainer = None

    def job_labels(self) -> tuple[str, dict[str, int]] | None:
        """``(where from, label set)`` a fine-tuning job's sites must declare; None for pre-training."""
        if get_method(self.method).pretraining:
            return None
        bundle = dict(self.config.get("bundle") or {})
        if "labels" in bundle:
            return "the job's label set", dict(bundle["labels"])
        parser = bundle_parser(self.config.get("bundle_dir"), "train", bundle)
        return "the bundle's default label set", dict(parser.get_parsed_content("labels"))

    def fail(
        self, fl_ctx: FLContext, round_num: int, kind: str, exc: BaseException | None, detail: str
    ) -> None:
        """Log a failure: ``detail`` and the traceback locally, the site, round and kind as an ERROR."""
        site = fl_ctx.get_identity_name()
        trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self.log_warning(fl_ctx, f"{detail}\n{trace}".rstrip(), fire_event=False)
        cause = f" ({type(exc).__name__})" if exc is not None else ""
        summary = f"{site}: round {round_num}: {kind}{cause}; the details are in the site's local log"
        self.logger.error(generate_log_message(fl_ctx, summary), extra=SAFE)

    def state_folder(self, fl_ctx: FLContext) -> Path:
        """Where this site keeps its trainer's state between rounds (survives the job):
        ``$FEDCONTRAST_STATE_DIR/<site>/<method>``, else ``<site workspace>/fedcontrast_state/<method>``."""
        site = fl_ctx.get_identity_name()
        if os.environ.get(STATE_DIR_ENV):
            return Path(os.environ[STATE_DIR_ENV]) / site / self.method
        return Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / "fedcontrast_state" / self.method

    def build_trainer(self, fl_ctx: FLContext) -> SiteTrainer:
        """The method's trainer on this site's data (see the module docstring for the datalist)."""
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        path, source = resolve_datalist(site, self.datalist, workspace.get_site_config_dir())
        self.log_info(fl_ctx, f"{site}: datalist {path} (from {source})", fire_event=False)
        entries = site_entries(
            site, path, self.datalist_keys, self.validation_key, self.min_volumes, self.job_labels()
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # local outputs (e.g. the bundle's checkpoints and logs) stay in the site's job folder
        workdir = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / LOCAL_OUTPUT_DIR
        config = {"workdir": str(workdir), **self.config}
        spec = get_method(self.method)
        try:
            self.schema = spec.trainer.outbound_schema(config)
            return spec.trainer(config, entries, site, device)
        except Exception as exc:
            raise RuntimeError(f"{site}: cannot set up {self.method!r} on {path}: {exc}") from exc

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        """One round: message in, ``local_round``, update out; errors are logged and replied as errors."""
        if task_name != self.task_name:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor handles {self.task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        redact_error_log()
        site = fl_ctx.get_identity_name()
        try:
            model = FLModelUtils.from_shareable(shareable)
            incoming = as_message(model.params)
        except ValueError as exc:
            self.fail(fl_ctx, -1, "bad task data", exc, f"{site}: bad task data: {exc}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        round_num = int(model.current_round or 0)
        # the round header lets the server's error message say which round failed
        failed = make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={AppConstants.CURRENT_ROUND: round_num})
        fault = injected_fault(site, round_num)
        if self.trainer is None:
            try:
                self.trainer = self.build_trainer(fl_ctx)
            except Exception as exc:  # the message names the site and its datalist: local log only
                self.fail(fl_ctx, round_num, "cannot set up the method on its data", exc, str(exc))
                return failed
            if round_num > 0:  # a resumed run: take back the state kept before this round
                try:
                    restored = load_site_state(self.state_folder(fl_ctx), self.trainer, round_num)
                    kept = "restored its state" if restored else "no state kept: a fresh trainer"
                except Exception as exc:  # not fatal: the site goes on with a fresh trainer
                    kept = f"its kept state is unusable ({exc}): a fresh trainer"
                self.log_info(fl_ctx, f"{site}: joining at round {round_num}: {kept}", fire_event=False)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        start = time.perf_counter()
        try:
            if fault == "raise":
                raise RuntimeError(f"{site}: injected fault ({FAULT_ENV})")
            if fault == "die":
                os._exit(3)
            while fault == "hang" and not abort_signal.triggered:
                time.sleep(0.5)
            update = self.trainer.local_round(incoming, round_num)
        except Exception as exc:
            detail = f"{site}: round {round_num} of {self.method!r} failed: {exc}"
            self.fail(fl_ctx, round_num, "training failed", exc, detail)
            return failed
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        try:
            save_site_state(self.state_folder(fl_ctx), self.trainer, round_num + 1)
        except Exception as exc:  # a resumed run would restart this site's state; not fatal
            self.log_warning(fl_ctx, f"{site}: cannot keep its state for a resume: {exc}", fire_event=False)
        if fault in ("nan", "extra"):
            update = corrupt(update, fault)
        self.log_info(
            fl_ctx,
            f"{site}: round {round_num} done, {update.num_samples} samples, {update.metrics}",
            fire_event=False,
        )
        fl_ctx.set_prop(OUTBOUND_SCHEMA_PROP, self.schema, private=True, sticky=False)
        result = update_to_flmodel(update, round_num)
        result.meta[TRAIN_SECONDS] = time.perf_counter() - start  # the server's round timing
        return FLModelUtils.to_shareable(result)
