"""NVFlare's simulator, with each client thread starting its own site and no other.

NVFlare 2.9's ``SimulatorClientRunner.do_one_task`` writes the client's name into one build
context shared by all its client threads (``self.build_ctx["client_name"]``) and sends that
context to the client's worker process a moment later. When two threads start their
workers together (the first round), a worker can receive the other thread's site name: it
then runs as that site and reads that site's datalist. Seen once in this project's CI,
under load. Started through this module, every client thread writes to a build context of
its own; everything else is NVFlare's simulator, unchanged.

With one client thread per site (what :func:`fedcontrast.flare.jobs.run_simulator` uses)
each site keeps one worker process for the whole run, so a trainer's state (memory banks,
momentum encoder, the PTNU target a site predicts and never downloads) lives across rounds
as it does in a deployment. With fewer threads than sites NVFlare starts a fresh worker for
every task and that state is lost.

    python -m fedcontrast.flare.simulator JOB_FOLDER -w WORKSPACE -c site-1,site-2 -t 2

runs any exported fedcontrast job folder; the workspace's ``local/resources.json`` is given
``"fedcontrast."`` in its ``class_allow_list`` first, as a provisioned site's is.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nvflare
from nvflare.private.fed.app.simulator import simulator as nvflare_simulator
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

from fedcontrast.flare.site_config import allow_installed_package


class ThreadBuildContext:
    """A build context whose items belong to the thread that reads or writes them.

    Each thread starts from a copy of ``shared``; pickling (how the context reaches a
    client's worker process) gives the calling thread's items as a plain dict.
    """

    def __init__(self, shared: dict[str, Any]):
        self._shared = dict(shared)
        self._local = threading.local()

    def _own(self) -> dict[str, Any]:
        if not hasattr(self._local, "context"):
            self._local.context = dict(self._shared)
        return self._local.context

    def __getitem__(self, key: str) -> Any:
        return self._own()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._own()[key] = value

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        return dict, (self._own(),)


_nvflare_do_one_task = SimulatorClientRunner.do_one_task
_install_lock = threading.Lock()


def _do_one_task_with_own_context(self: SimulatorClientRunner, *args: Any, **kwargs: Any) -> Any:
    with _install_lock:
        if not isinstance(self.build_ctx, ThreadBuildContext):
            self.build_ctx = ThreadBuildContext(self.build_ctx)
    return _nvflare_do_one_task(self, *args, **kwargs)


#: The NVFlare release the patch was written for, and the line of ``do_one_task`` it relies on
#: (the thread writes its site's name into the shared build context, then sends the context).
PATCHED_VERSION = "2.9."
PATCHED_LINE = 'self.build_ctx["client_name"] = client.client_name'


def check_patch_applies(version: str | None = None, method: Callable[..., Any] | None = None) -> None:
    """Refuse to patch an NVFlare whose ``SimulatorClientRunner.do_one_task`` is not the one known.

    Args:
        version: NVFlare's version (default: the installed one's).
        method: the method to be wrapped (default: NVFlare's ``do_one_task``).

    Raises:
        RuntimeError: another NVFlare release, or ``do_one_task`` no longer writes the site name
            into ``self.build_ctx`` as :data:`PATCHED_LINE`; the message says what to check.
    """
    version = nvflare.__version__ if version is None else version
    method = _nvflare_do_one_task if method is None else method
    if not version.startswith(PATCHED_VERSION):
        raise RuntimeError(
            f"fedcontrast.flare.simulator patches NVFlare {PATCHED_VERSION}x's "
            f"SimulatorClientRunner.do_one_task; NVFlare {version} is installed: check whether its "
            "simulator still shares one build context between client threads, then update the patch "
            "(or pin nvflare)"
        )
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError) as exc:
        raise RuntimeError(
            f"cannot read NVFlare's SimulatorClientRunner.do_one_task to check the patch: {exc}"
        ) from exc
    if PATCHED_LINE not in source:
        raise RuntimeError(
            "NVFlare's SimulatorClientRunner.do_one_task no longer contains the line the simulator patch "
            f"relies on ({PATCHED_LINE}); the patch would not apply: update fedcontrast.flare.simulator"
        )


def install() -> None:
    """Give every client thread of this process's simulator runs its own build context.

    Raises:
        RuntimeError: the installed NVFlare is not the one the patch was written for
            (:func:`check_patch_applies`).
    """
    check_patch_applies()
    SimulatorClientRunner.do_one_task = _do_one_task_with_own_context


def main(argv: Sequence[str] | None = None) -> int:
    """``nvflare simulator``'s arguments; returns its exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    nvflare_simulator.define_simulator_parser(parser)
    args = parser.parse_args(argv)
    allow_installed_package(Path(args.workspace).resolve() / "local")  # the jobs carry no code
    install()
    if sys.platform.startswith("linux"):
        # the runner's client process must inherit install(): fork (Python 3.11's default
        # here), stated because later Pythons default to forkserver
        multiprocessing.set_start_method("fork", force=True)
    return nvflare_simulator.run_simulator(args)


if __name__ == "__main__":
    sys.exit(main())
