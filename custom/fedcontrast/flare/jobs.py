"""Job builders: one NVFlare ``FedJob`` for any registered method, run in the simulator or exported.

A job is a :class:`~fedcontrast.flare.controller.MethodController` on the server,
one :class:`~fedcontrast.flare.executor.MethodExecutor` for every site (one app,
deployed to ``@ALL``: one job folder serves every hospital) and, for pre-training
methods with privacy switched on, a
:class:`~fedcontrast.flare.filters.FeaturePrivacyFilter` on the sites' results of
the pre-training task and, when the method's ``transfer`` setting is float16 or blockwise8,
the quantisation filter pair of :mod:`fedcontrast.flare.quantize` on both sides. Components
get plain arguments (names, dicts, paths), never
live torch objects.

**Deployment choice: the installed package, not bring-your-own-code.** The job
folder names ``fedcontrast.*`` classes and carries no code (``custom/`` is absent,
so neither fedcontrast nor torch/MONAI is copied into it). Every site and the
server install the same ``fedcontrast`` (``pip install fedcontrast`` or this
repository) and allow its classes in their ``local/resources.json``
``class_allow_list`` (:func:`~fedcontrast.flare.site_config.allow_installed_package` adds ``"fedcontrast."``);
submitting needs no ``byoc`` right. The simulator run here does the same in its
workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from fedcontrast.cli import UserError, check_output_folders
from fedcontrast.data.labels import common_label_set
from fedcontrast.data.splits import site_names
from fedcontrast.flare.controller import (
    DECODER_FILE,
    ENCODER_FILE,
    LOCAL_DIR,
    MODEL_BUNDLE_DIR,
    MODEL_FILE,
    STATUS_FILE,
    TASK_CHECK_PERIOD,
    MethodController,
)
from fedcontrast.flare.executor import STATE_DIR_ENV, MethodExecutor
from fedcontrast.flare.filters import FeaturePrivacyFilter, OutboundPolicyFilter
from fedcontrast.flare.ledger import BYTES_FILE, METRICS_FILE, TENSORBOARD_DIR
from fedcontrast.flare.process_group import run_process_group
from fedcontrast.flare.quantize import NetworkDequantizer, NetworkQuantizer
from fedcontrast.flare.site_config import PACKAGE, SITE_PLACEHOLDER, write_privacy_policy
from fedcontrast.methods.base import merge_config
from fedcontrast.methods.checkpoint import SERVER_STATE_FILE
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.transfer import transfer_precision

#: Task names: the feature privacy filter is bound to the pre-training task.
PRETRAIN_TASK = "pretrain"
TRAIN_TASK = "train"
#: Where the simulator's server writes its results, under the simulator workspace.
SIMULATOR_RESULT_DIR = Path("server") / "simulate_job"
#: Seconds a site waits, after a task or an empty poll, before asking for its next task.
#: NVFlare's default (2 s) is paid once per round by every method; a site polling 5 times a
#: second while the server aggregates costs the server a few tiny requests per site.
TASK_REQUEST_INTERVAL = 0.2
#: What :func:`collect_results` copies.
RESULT_FILES = (
    MODEL_FILE,
    MODEL_BUNDLE_DIR,
    ENCODER_FILE,
    DECODER_FILE,
    BYTES_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    LOCAL_DIR,
)


def task_name(method: str) -> str:
    """The task a method's job sends: ``pretrain`` for pre-training methods, else ``train``."""
    return PRETRAIN_TASK if get_method(method).pretraining else TRAIN_TASK


def with_label_set(config: Mapping[str, Any], datalist: str, num_sites: int) -> dict[str, Any]:
    """``config`` with ``bundle.labels`` set to the label set the sites' datalists declare.

    ``datalist`` is the job's template (``{site}`` for the site name; "" leaves ``config`` as it
    is); a site whose file does not exist is left to report itself when the job runs. The set sets
    the network's output channels and every class name of the run's metrics.

    Raises:
        ValueError: two datalists, or a datalist and ``config``'s own ``bundle.labels``, declare
            different label sets (the message names both), or a datalist is not JSON.
    """
    config = dict(config)
    declared: dict[str, Mapping[str, int]] = {}
    given = dict(config.get("bundle") or {}).get("labels")
    if given is not None:
        declared["the job config's bundle.labels"] = given
    for site in site_names(num_sites) if datalist else []:
        path = Path(datalist.replace(SITE_PLACEHOLDER, site))
        if path.is_file():
            try:
                labels = json.loads(path.read_text()).get("labels")
            except json.JSONDecodeError as exc:
                raise ValueError(f"{site}: datalist {path} is not JSON: {exc}") from exc
            declared[f"{site}'s datalist {path}"] = labels
    if declared:
        config["bundle"] = {**dict(config.get("bundle") or {}), "labels": common_label_set(declared)}
    return config


def build_job(
    method: str,
    config: Mapping[str, Any],
    num_rounds: int,
    num_sites: int,
    datalist: str = "",
    *,
    name: str | None = None,
    datalist_keys: Sequence[str] | None = None,
    validation_key: str | None = None,
    min_volumes: int = 1,
    federated: bool = True,
    feature_clip: float = 0.0,
    feature_noise: float = 0.0,
    task_timeout: int = 0,
    first_round_timeout: int = 0,
    record_messages: bool = False,
    task_request_interval: float = TASK_REQUEST_INTERVAL,
    task_check_period: float = TASK_CHECK_PERIOD,
    min_responses: int = 0,
    exclude_bad_updates: bool = False,
    outbound_policy: bool = True,
    resume_from: str = "",
) -> FedJob:
    """The NVFlare job of ``method``.

    Args:
        method: registered method name.
        config: the method's configuration (JSON-serialisable; sent to the server and every site).
        num_rounds: federated rounds.
        num_sites: sites the job needs (``min_clients``).
        datalist: the sites' datalist template, ``{site}`` for the site name ("" when every
            site configures its own; see :mod:`fedcontrast.flare.executor`).
        name: job name (default: the method name).
        datalist_keys: site datalist lists to train on (default: ``training`` + ``unlabeled``
            for pre-training methods, ``training`` otherwise).
        validation_key: site datalist list held out for per-round validation (default: ``test``
            for fine-tuning methods, none for pre-training ones).
        min_volumes: fewest training entries a site must have.
        federated: False: no aggregation, each site trains alone (same job, see the controller).
        feature_clip, feature_noise: the feature privacy filter (pre-training methods; 0 and 0: off).
        task_timeout: seconds a site may take per round (0: no limit).
        first_round_timeout: seconds a site may take for the run's first round, its start-up
            included (0: ``task_timeout``).
        record_messages: save every message on the server (audit, tests).
        task_request_interval: seconds a site waits before asking the server for its next task,
            written as ``server.task_request_interval`` in the job's server config (NVFlare's
            default is 2 s, which every round pays once; see :data:`TASK_REQUEST_INTERVAL`).
        task_check_period: seconds between the server's checks for finished tasks (see
            :class:`~fedcontrast.flare.controller.MethodController`).
        min_responses: fewest sites a round needs (0: all; see the controller's dropout rules).
        exclude_bad_updates: leave a refused update out of its round instead of stopping the run.
        resume_from: the server state file of a stopped run to continue ("": start afresh).
        outbound_policy: also attach the outbound policy filter to the job's results (a site's
            own ``local/privacy.json`` applies it whatever the job says).

    A fine-tuning job given a ``datalist`` template takes its label set from the sites'
    datalists (:func:`with_label_set`); one exported without gets it from ``config``'s
    ``bundle.labels`` (default: the bundle's), and each site refuses a datalist declaring another.
    """
    spec = get_method(method)
    task = task_name(method)
    if datalist_keys is None:
        datalist_keys = ("training", "unlabeled") if spec.pretraining else ("training",)
    if validation_key is None:
        validation_key = "" if spec.pretraining else "test"
    if min_responses < 0 or min_responses > num_sites:
        raise ValueError(
            f"min_responses must be between 0 (all) and the {num_sites} site(s), got {min_responses}"
        )
    if (feature_clip or feature_noise) and not spec.pretraining:
        raise ValueError(f"the feature privacy filter applies to pre-training methods, not {method!r}")
    config = json.loads(json.dumps(dict(config)))  # a plain JSON copy: what the job config will hold
    if not spec.pretraining:
        config = with_label_set(config, datalist, num_sites)
    job = FedJob(name=name or method, min_clients=num_sites)
    job.set_app_packages([PACKAGE])
    controller = MethodController(
        method=method,
        config=config,
        num_rounds=num_rounds,
        min_clients=num_sites,
        task_name=task,
        federated=federated,
        task_timeout=task_timeout,
        first_round_timeout=first_round_timeout,
        record_messages=record_messages,
        task_check_period=task_check_period,
        min_responses=min_responses,
        exclude_bad_updates=exclude_bad_updates,
        resume_from=resume_from,
    )
    job.to_server(controller, id="controller")
    if task_request_interval <= 0:
        raise ValueError(f"task_request_interval must be > 0 seconds, got {task_request_interval}")
    job.to_server({"server": {"task_request_interval": task_request_interval}})
    executor = MethodExecutor(
        method=method,
        config=config,
        datalist=datalist,
        datalist_keys=list(datalist_keys),
        validation_key=validation_key,
        min_volumes=min_volumes,
        task_name=task,
    )
    job.to_clients(executor, tasks=[task])
    if feature_clip or feature_noise:
        privacy = FeaturePrivacyFilter(clip_norm=feature_clip, noise_std=feature_noise)
        job.to_clients(privacy, filter_type=FilterType.TASK_RESULT, tasks=[task])
    if outbound_policy:
        # after the feature noise, before the quantiser: it checks the message as the method
        # declares it (NVFlare runs the site's own privacy scope, then these job filters)
        job.to_clients(OutboundPolicyFilter(), filter_type=FilterType.TASK_RESULT, tasks=[task])
    precision = transfer_precision(config)
    if precision != "float32":
        # NVFlare's placement of a quantiser pair: server -> site task data, site -> server results
        job.to_server(NetworkQuantizer(precision), filter_type=FilterType.TASK_DATA, tasks=[task])
        job.to_clients(NetworkDequantizer(), filter_type=FilterType.TASK_DATA, tasks=[task])
        job.to_clients(NetworkQuantizer(precision), filter_type=FilterType.TASK_RESULT, tasks=[task])
        job.to_server(NetworkDequantizer(), filter_type=FilterType.TASK_RESULT, tasks=[task])
    return job


def run_simulator(
    job: FedJob, workspace: str | Path, num_sites: int, grace_s: float = 20.0, resumed: bool = False
) -> Path:
    """Run ``job`` in the NVFlare simulator with ``site-1 … site-K``; returns the server's result folder.

    One client thread per site, so every site keeps its worker process, and its trainer's
    state, for the whole run; started through :mod:`fedcontrast.flare.simulator`, which keeps
    the threads from starting a site under another site's name. The sites share this machine's
    cores: unless ``OMP_NUM_THREADS`` is set, each site's PyTorch gets ``cores // sites`` threads
    (at least one), since K sites each starting one thread per core oversubscribe the CPU.
    The workspace's ``local/`` gets the sites' outbound policy
    (:func:`~fedcontrast.flare.site_config.write_privacy_policy`) unless it holds one already.

    The simulator runs in a process group of its own, which this function always ends, with
    every process it started (:func:`~fedcontrast.flare.process_group.end_group`): when
    the controller reports the run finished or aborted (``run_status.json``) and the simulator
    has not exited ``grace_s`` seconds later (NVFlare's simulator can keep waiting for a dead
    site), on SIGINT/SIGTERM, and on any other way out. The previous run's results are moved
    aside first and put back when this run fails, so a failed re-run never deletes a model;
    except when ``resumed`` (the job continues that run: ``--resume``) and the failed run
    completed a round of its own: its results then stay, since they continue the same run further
    (the sites keep only their latest states, so the set-aside server state could no longer be
    resumed with the state the sites kept), and the set-aside ones stay in :func:`previous_results`.

    Raises:
        RuntimeError: the simulation failed or was aborted; the message says why and where the logs are.
    """
    workspace = Path(workspace).resolve()
    write_privacy_policy(workspace / "local")
    result_dir = workspace / SIMULATOR_RESULT_DIR
    previous = set_aside(result_dir)
    # the sites' state for a resume, outside the workspace the simulator empties at start
    env = {STATE_DIR_ENV: str(site_state_root(workspace)), **os.environ}
    with tempfile.TemporaryDirectory() as job_root:
        job_dir = export_job(job, job_root)
        command = [sys.executable, "-m", "fedcontrast.flare.simulator", str(job_dir), "-w", str(workspace)]
        command += ["-c", ",".join(site_names(num_sites)), "-t", str(num_sites)]
        env.setdefault("OMP_NUM_THREADS", str(threads_per_site(num_sites)))
        try:
            code, status = run_process_group(command, result_dir / STATUS_FILE, grace_s, env)
        except BaseException:
            restore(previous, result_dir)
            raise
    logs = f"logs: {result_dir / 'log.txt'} and {workspace}/<site>/simulate_job/log.txt"
    if status.get("status") == "finished":
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return result_dir
    if resumed and (result_dir / SERVER_STATE_FILE).is_file():
        # the resumed run got further than the stopped one: its state is the one to resume from
        kept = f"; --resume continues from the state in {result_dir} (the stopped run's: {previous})"
    else:
        restore(previous, result_dir)
        kept = f"; the previous run's results are back in {result_dir}" if previous is not None else ""
    if status.get("status") == "aborted":
        raise RuntimeError(f"the run stopped: {status.get('reason', 'aborted')}{kept}; {logs}")
    raise RuntimeError(f"simulation failed (exit code {code}){kept}; {logs}")


def site_state_root(workspace: Path) -> Path:
    """Where the simulator's sites keep their state for a resume: ``<workspace>.sites``."""
    return workspace.with_name(workspace.name + ".sites")


def previous_results(result_dir: Path) -> Path:
    """Where :func:`set_aside` keeps the previous run's results: ``<workspace>.previous``."""
    return result_dir.parents[1].with_name(result_dir.parents[1].name + ".previous")


def set_aside(result_dir: Path) -> Path | None:
    """Move a previous run's ``result_dir`` out of the simulator's workspace (which the simulator
    empties at start); returns where it went, or None when there was none."""
    if not result_dir.is_dir():
        return None
    aside = previous_results(result_dir)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.move(str(result_dir), aside)
    return aside


def restore(previous: Path | None, result_dir: Path) -> None:
    """Put a set-aside result folder back in place of a failed run's."""
    if previous is None or not previous.is_dir():
        return
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(previous), result_dir)


def threads_per_site(num_sites: int) -> int:
    """PyTorch threads for each of ``num_sites`` simulated sites sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, num_sites))


def export_job(job: FedJob, out_dir: str | Path) -> Path:
    """Write the deployable job folder ``out_dir/<job name>``; returns it."""
    out_dir = Path(out_dir).resolve()
    job.export_job(str(out_dir))
    return out_dir / job.name


def collect_results(result_dir: Path, output: Path | None) -> list[Path]:
    """The run's models and ledger in ``result_dir``, copied to ``output`` when given; returns their paths."""
    found = [result_dir / f for f in RESULT_FILES if (result_dir / f).exists()]
    if output is None:
        return found
    output.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in found:
        dest = output / path.name
        if path.is_dir():
            shutil.copytree(path, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dest)
        copied.append(dest)
    return copied


def job_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every ``jobs/<name>/job.py`` shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sites", type=int, default=2, help="number of sites, site-1 … site-K (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--datalist-dir",
        type=Path,
        help="folder of the site datalists <site>.json (from `fedcontrast data split`); the job's "
        "default, which a site overrides with $FEDCONTRAST_DATALIST or local/fedcontrast.json",
    )
    parser.add_argument(
        "--config", help="method configuration overrides: a JSON file or a JSON string (e.g. the network)"
    )
    parser.add_argument("--min-volumes", type=int, default=1, help="fewest training volumes a site needs")
    parser.add_argument(
        "--task-timeout",
        type=int,
        default=0,
        metavar="S",
        help="a site that has not answered a round after S seconds is left out (see --min-clients) "
        "(default 0: wait)",
    )
    parser.add_argument(
        "--first-round-timeout",
        type=int,
        default=0,
        metavar="S",
        help="the --task-timeout of the run's first round, which also pays each site's start-up "
        "(default 0: the same)",
    )
    parser.add_argument(
        "--min-clients",
        type=int,
        default=0,
        metavar="N",
        help="a round goes on with the sites that answered (within --task-timeout) when at least N did; "
        "the others are named in the log (default 0: every site, else the run stops naming them)",
    )
    parser.add_argument(
        "--exclude-bad-updates",
        action="store_true",
        help="leave a site whose update is refused (NaN/Inf, unexpected entries or shapes) out of the "
        "round instead of stopping the run",
    )
    parser.add_argument(
        "--local", action="store_true", help="each site trains alone: no averaging, one model per site"
    )
    parser.add_argument(
        "--workspace",
        type=Path,
        default=Path("workspace") / "jobs" / name,
        help="simulator workspace (default %(default)s)",
    )
    parser.add_argument("--output", type=Path, help="also copy the models and the ledger to this folder")
    parser.add_argument(
        "--export", type=Path, metavar="DIR", help="write the deployable job folder to DIR instead of running"
    )
    parser.add_argument("--record-messages", action="store_true", help="save every message (audit)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run last stopped in --workspace from its last complete round (the server "
        "state and the sites' state are saved after every round)",
    )
    return parser


def read_config(value: str | None) -> dict[str, Any]:
    """``--config``: a JSON file's content, a JSON string, or {} for None."""
    if not value:
        return {}
    try:
        is_file = Path(value).is_file()
    except OSError:  # a JSON string longer than a file name can be
        is_file = False
    text = Path(value).read_text() if is_file else value
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config must be a JSON file or a JSON object string: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError("--config must hold a JSON object")
    return config


#: Configuration keys naming a file the server reads (resolved against the folder the job is built from).
SERVER_FILE_KEYS = ("initial_encoder",)


def resolve_server_files(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the :data:`SERVER_FILE_KEYS` it sets made absolute: the simulator's server runs
    in its workspace, so a path relative to the caller's folder would not be found there. A path
    that must name a file on a deployed server should be given as that server sees it."""
    return {k: str(Path(v).resolve()) if k in SERVER_FILE_KEYS and v else v for k, v in config.items()}


def datalist_template(datalist_dir: Path | None) -> str:
    """``<dir>/{site}.json`` as an absolute path, or "" when no folder is given."""
    return str(datalist_dir.resolve() / f"{SITE_PLACEHOLDER}.json") if datalist_dir else ""


def add_privacy_options(parser: argparse.ArgumentParser) -> None:
    """``--feature-clip`` and ``--feature-noise``: the feature privacy filter of pre-training jobs."""
    parser.add_argument(
        "--feature-clip",
        type=float,
        default=0.0,
        metavar="C",
        help="clip each feature to L2 norm C (0: no clip)",
    )
    parser.add_argument(
        "--feature-noise",
        type=float,
        default=0.0,
        metavar="Z",
        help="Gaussian noise of std Z*C on each feature value (C = 1 without a clip: FCL's are unit-norm)",
    )


def run_from_args(
    method: str, args: argparse.Namespace, config: Mapping[str, Any], name: str | None = None, **options: Any
) -> int:
    """Build ``method``'s job from :func:`job_parser`'s options, then run or export it.

    Args:
        method: registered method name.
        args: parsed options of :func:`job_parser` (plus :func:`add_privacy_options` where given).
        config: the job's own method settings; ``--config`` is merged over them (dicts such as
            ``bundle`` key by key).
        name: job name (default: the method name); ``_local`` is appended with ``--local``.
        options: further :func:`build_job` keyword arguments.
    """
    name = name or method
    settings = merge_config(
        {"local_epochs": args.local_epochs, "seed": args.seed, **config}, read_config(args.config)
    )
    job = build_job(
        method,
        resolve_server_files(settings),
        num_rounds=args.rounds,
        num_sites=args.sites,
        datalist=datalist_template(args.datalist_dir),
        name=f"{name}_local" if args.local else name,
        min_volumes=args.min_volumes,
        task_timeout=args.task_timeout,
        first_round_timeout=args.first_round_timeout,
        min_responses=args.min_clients,
        exclude_bad_updates=args.exclude_bad_updates,
        federated=not args.local,
        feature_clip=getattr(args, "feature_clip", 0.0),
        feature_noise=getattr(args, "feature_noise", 0.0),
        record_messages=args.record_messages,
        resume_from=str(resume_state(args)) if getattr(args, "resume", False) else "",
        **options,
    )
    return run_or_export(job, args)


def resume_state(args: argparse.Namespace) -> Path:
    """``--resume``: the server state the stopped run in ``--workspace`` left (it is moved aside,
    to :func:`previous_results`, before the simulator starts).

    Raises:
        SystemExit: there is nothing to resume.
    """
    result_dir = Path(args.workspace).resolve() / SIMULATOR_RESULT_DIR
    if not (result_dir / SERVER_STATE_FILE).is_file():
        raise SystemExit(
            f"--resume: no {SERVER_STATE_FILE} in {result_dir}: no stopped run to continue there"
        )
    return previous_results(result_dir) / SERVER_STATE_FILE


def run_or_export(job: FedJob, args: argparse.Namespace) -> int:
    """``--export DIR``: write the job folder; else run it in the simulator and report the results.

    Raises:
        SystemExit: ``--export``, ``--workspace`` or ``--output`` names an existing file.
    """
    try:
        check_output_folders(args)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.export:
        print(f"job folder: {export_job(job, args.export)}")
        return 0
    if not args.datalist_dir:
        raise SystemExit("--datalist-dir is required to run in the simulator")
    try:
        result_dir = run_simulator(
            job, args.workspace, args.sites, resumed=bool(getattr(args, "resume", False))
        )
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"server results: {result_dir}")
    for path in collect_results(result_dir, args.output):
        print(f"  {path}")
    return 0
