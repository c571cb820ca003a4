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
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.labels import common_label_set
from fedcontrast.flare.messages import TRAIN_SECONDS, as_message, update_to_flmodel
from fedcontrast.flare.site_config import resolve_datalist
from fedcontrast.methods.base import SiteTrainer
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.supervised import VALIDATION
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
    held_out = datalist.get(validation_key, []) if validation_key else []
    return entries + [{**e, "split": VALIDATION} for e in held_out]


#: Folder of the site's job run directory for the method's local outputs.
LOCAL_OUTPUT_DIR = "fedcontrast"


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

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Drop the trainer (its data and model) when the run ends."""
        if event_type == EventType.END_RUN:
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

    def build_trainer(self, fl_ctx: FLContext) -> SiteTrainer:
        """The method's trainer on this site's data (see the module docstring for the datalist)."""
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        path, source = resolve_datalist(site, self.datalist, workspace.get_site_config_dir())
        self.log_info(fl_ctx, f"{site}: datalist {path} (from {source})")
        entries = site_entries(
            site, path, self.datalist_keys, self.validation_key, self.min_volumes, self.job_labels()
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # local outputs (e.g. the bundle's checkpoints and logs) stay in the site's job folder
        workdir = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / LOCAL_OUTPUT_DIR
        config = {"workdir": str(workdir), **self.config}
        try:
            return get_method(self.method).trainer(config, entries, site, device)
        except Exception as exc:
            raise RuntimeError(f"{site}: cannot set up {self.method!r} on {path}: {exc}") from exc

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        """One round: message in, ``local_round``, update out; errors are logged and replied as errors."""
        if task_name != self.task_name:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor handles {self.task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        try:
            model = FLModelUtils.from_shareable(shareable)
            incoming = as_message(model.params)
        except ValueError as exc:
            self.log_error(fl_ctx, f"{site}: bad task data: {exc}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        round_num = int(model.current_round or 0)
        # the round header lets the server's error message say which round failed
        failed = make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={AppConstants.CURRENT_ROUND: round_num})
        if self.trainer is None:
            try:
                self.trainer = self.build_trainer(fl_ctx)
            except Exception as exc:  # the message names the site and its datalist
                self.log_exception(fl_ctx, str(exc))
                return failed
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        start = time.perf_counter()
        try:
            update = self.trainer.local_round(incoming, round_num)
        except Exception as exc:
            self.log_exception(fl_ctx, f"{site}: round {round_num} of {self.method!r} failed: {exc}")
            return failed
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(
            fl_ctx, f"{site}: round {round_num} done, {update.num_samples} samples, {update.metrics}"
        )
        result = update_to_flmodel(update, round_num)
        result.meta[TRAIN_SECONDS] = time.perf_counter() - start  # the server's round timing
        return FLModelUtils.to_shareable(result)
