"""``fedcontrast deploy``: provision a deployment, configure a site, submit a job, or run it all locally."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from fedcontrast.cli import UserError
from fedcontrast.data.splits import site_names
from fedcontrast.deploy.admin import COMPONENTS_DIR, WORKSPACE_DIR, JobOutcome, job_folder, run_job
from fedcontrast.deploy.project import (
    DEFAULT_PROJECT,
    load_project,
    provision,
    with_sites,
    write_project,
)

#: Files of a job's result that the summary points at, when present.
RESULT_FILES = (
    "global_model.pt",
    "model_bundle",
    "pretrained_encoder.pt",
    "pretrained_decoder.pt",
    "bytes.json",
    "metrics.json",
)

POC_HELP = """\
Provision deploy/project.yml for N sites on this machine (server "localhost", free loopback
ports, certificates), point each site at WORKSPACE/data/splits/site-k.json (or DATA/site-k.json)
in its own local/fedcontrast.json, start the server and one process per site, submit the job
through the FLARE API, follow it, download its results into WORKSPACE/results/<job id> and
stop every process it started. Options after `--` go to jobs/<JOB>/job.py, e.g.
`--rounds 2 -- --config '{"bundle": {"init_filters": 8}}'`."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedcontrast deploy {provision,site,submit,poc}`` and ``fedcontrast job export``."""
    job = subparsers.add_parser("job", help="job folders from the installed package's job scripts")
    job_commands = job.add_subparsers(dest="job_command", required=True, metavar="JOB_COMMAND")
    export = job_commands.add_parser(
        "export",
        help="write a deployable job folder (no checkout needed)",
        description="Export jobs/<JOB>/job.py of the installed package into OUT/<job name>. JOB is a job "
        "(fcl, fclopt, finetune) or a pre-training method, exported through the fcl job. Options after "
        '`--` go to the job script, e.g. `-- --config \'{"bundle": {"init_filters": 8}}\'`.',
    )
    export.add_argument("job", metavar="JOB", help="job or pre-training method name")
    export.add_argument("--out", type=Path, required=True, help="folder to write (new or empty)")
    export.add_argument("--sites", type=int, default=3, help="number of sites the job needs (default 3)")
    export.add_argument("--rounds", type=int, help="federated rounds (the job script's --rounds)")
    export.add_argument("job_args", nargs="*", metavar="-- JOB_OPTION", help="options of the job script")
    export.set_defaults(func=run_job_export)

    deploy = subparsers.add_parser("deploy", help="NVFlare deployment: kits, sites, jobs, local run")
    commands = deploy.add_subparsers(dest="deploy_command", required=True, metavar="DEPLOY_COMMAND")

    prov = commands.add_parser(
        "provision",
        help="startup kits for the server, the admin and every site (wraps `nvflare provision`)",
        description="Run `nvflare provision` on the project file; every kit allows fedcontrast's components.",
    )
    prov.add_argument("--project", type=Path, default=DEFAULT_PROJECT, help="project file (%(default)s)")
    prov.add_argument("--sites", type=int, help="replace the project's sites by site-1..site-N")
    prov.add_argument("--workspace", type=Path, default=Path("workspace/provision"), help="(%(default)s)")
    prov.set_defaults(func=run_provision)

    site = commands.add_parser(
        "site",
        help="a hospital: point its startup kit at its datalist and allow fedcontrast's components",
        description="Check DATALIST, write KIT/local/fedcontrast.json and, if the kit's policy lacks it, "
        'add "fedcontrast." to KIT/local/resources.json class_allow_list.',
    )
    site.add_argument("--kit", type=Path, required=True, help="the site's startup kit (its workspace)")
    site.add_argument("--datalist", type=Path, required=True, help="its site datalist (data split)")
    site.set_defaults(func=run_site)

    submit = commands.add_parser(
        "submit",
        help="submit a job with an admin startup kit, follow it, download its results, report each site",
    )
    submit.add_argument("--admin-kit", type=Path, required=True, help="the project admin's startup kit")
    _add_job_arguments(submit, results=Path("workspace/results"))
    submit.set_defaults(func=run_submit)

    poc = commands.add_parser(
        "poc", help="a real server and sites on this machine: provision, start, submit, wait, stop",
        description=POC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    poc.add_argument("--project", type=Path, default=DEFAULT_PROJECT, help="project file (%(default)s)")
    poc.add_argument("--workspace", type=Path, default=Path("workspace/poc"), help="(%(default)s)")
    poc.add_argument("--data", type=Path, help="folder of site-k.json datalists (default: a phantom)")
    _add_job_arguments(poc, results=None)
    poc.set_defaults(func=run_poc)


def _add_job_arguments(parser: argparse.ArgumentParser, results: Path | None) -> None:
    parser.add_argument("--sites", type=int, default=3, help="number of sites the job needs (default 3)")
    parser.add_argument("--job", default="fcl", help="jobs/<JOB>/job.py to export, or an exported job folder")
    if results is not None:
        parser.add_argument("--results", type=Path, default=results, help="download folder (%(default)s)")
    parser.add_argument("--rounds", type=int, help="federated rounds (the job script's --rounds)")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds to wait (0: no limit)")
    parser.add_argument("job_args", nargs="*", metavar="-- JOB_OPTION", help="options of jobs/<JOB>/job.py")


def job_options(args: argparse.Namespace) -> list[str]:
    """The job script's options: ``--rounds`` when given, then those after ``--``."""
    return (["--rounds", str(args.rounds)] if args.rounds is not None else []) + list(args.job_args)


def user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report run-time failures (provisioning, an exited process, a timeout) without a traceback."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (RuntimeError, TimeoutError) as exc:
            raise UserError(str(exc)) from exc

    return wrapper


@user_errors
def run_job_export(args: argparse.Namespace) -> int:
    """``job export``."""
    from fedcontrast.deploy.admin import export_job, job_names
    from fedcontrast.methods.registry import available_methods

    name, options = args.job, job_options(args)
    if name not in job_names() and name in available_methods(pretraining=True):
        name, options = "fcl", ["--method", args.job, *options]
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: give a new or empty folder")
    folder = export_job(name, out, args.sites, options)
    print(f"job folder: {folder}")
    return 0


@user_errors
def run_provision(args: argparse.Namespace) -> int:
    """``deploy provision``."""
    project_file = args.project
    if args.sites:
        project = with_sites(load_project(args.project), site_names(args.sites))
        project_file = write_project(project, args.workspace / "project.yml")
        print(f"project file for {args.sites} site(s): {project_file}")
    prod_dir = provision(project_file, args.workspace)
    print(f"startup kits: {prod_dir}")
    for kit in sorted(p for p in prod_dir.iterdir() if p.is_dir()):
        print(f"  {kit.name}")
    print("Give each participant its kit; each site runs `fedcontrast deploy site` then startup/start.sh.")
    return 0


def run_site(args: argparse.Namespace) -> int:
    """``deploy site``."""
    from fedcontrast.deploy.site import configure_site

    for line in configure_site(args.kit, args.datalist):
        print(line)
    return 0


def admin_user(admin_kit: Path) -> str:
    """The user name of an admin startup kit (its ``fed_admin.json``, else the kit's folder name)."""
    config = admin_kit / "startup" / "fed_admin.json"
    if not config.is_file():
        raise ValueError(f"{admin_kit} is not an admin startup kit (no {config})")
    return json.loads(config.read_text())["admin"].get("username") or admin_kit.resolve().name


def quiet_nvflare(args: argparse.Namespace) -> None:
    """Keep NVFlare's client-side INFO records (connections, transfers) out of the output unless ``-v``."""
    if not args.verbose:
        logging.getLogger("nvflare").setLevel(logging.WARNING)


@user_errors
def run_submit(args: argparse.Namespace) -> int:
    """``deploy submit``."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    quiet_nvflare(args)
    user = admin_user(args.admin_kit)
    job_dir = job_folder(args.job, args.results / "exported-job", args.sites, job_options(args))
    with closing(new_secure_session(user, str(args.admin_kit.resolve()), timeout=30.0)) as session:
        outcome = run_job(session, job_dir, args.results, args.timeout)
    return report(outcome)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` so that clean-up code runs, as it does on Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@user_errors
def run_poc(args: argparse.Namespace) -> int:
    """``deploy poc``."""
    from fedcontrast.deploy.poc import LocalDeployment, provision_local, site_datalists

    quiet_nvflare(args)
    workspace = args.workspace.resolve()
    sites = site_names(args.sites)
    if args.data is None:
        from fedcontrast.demo import prepare_data

        print(f"generating a phantom for {args.sites} site(s) in {workspace / 'data'}")
        args.data = prepare_data(workspace / "data", args.sites, patients_per_site=4, seed=0)
    datalists = site_datalists(args.data, sites)
    job_dir = job_folder(args.job, workspace / "exported-job", args.sites, job_options(args))
    prod_dir, project = provision_local(workspace, datalists, args.project)
    try:
        with sigterm_as_exit(), LocalDeployment(prod_dir, project) as deployment:
            deployment.start()
            with closing(deployment.session()) as session:
                outcome = run_job(session, job_dir, workspace / "results", args.timeout)
    except KeyboardInterrupt:
        print("interrupted; every process this run started is stopped", file=sys.stderr)
        return 130
    print(f"kits and site logs: {prod_dir}/<participant>/")
    return report(outcome)


def report(outcome: JobOutcome) -> int:
    """Print how the job and each participant fared and where its results are; 0 if it completed."""
    print(f"job {outcome.job_id}: {outcome.meta.get('status')}")
    for participant in outcome.reports:
        print(f"  {participant}")
    print(f"results: {outcome.result_dir}")
    workspace = outcome.result_dir / WORKSPACE_DIR
    error_logs = sorted((outcome.result_dir / COMPONENTS_DIR).glob("*"))
    for path in [workspace / name for name in RESULT_FILES] + error_logs:
        if path.exists():
            print(f"  {path.relative_to(outcome.result_dir)}")
    if (workspace / "bytes.json").is_file():
        totals = json.loads((workspace / "bytes.json").read_text())["totals"]
        for direction, kinds in totals.items():
            print(f"  bytes {direction}: " + ", ".join(f"{kind} {n:,}" for kind, n in kinds.items() if n))
    return 0 if outcome.completed else 1
