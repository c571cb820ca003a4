"""Suite-wide test settings."""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: The benchmark scripts import their siblings (``partition_signal``, ``data_per_site``), so
#: their folder is on the path and their tests import them by name.
sys.path.insert(0, str(REPO / "benchmarks"))


def job_module(name: str) -> ModuleType:
    """``jobs/<name>/job.py`` imported as the module ``job_<name>`` (every job's file is ``job.py``)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / name / "job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recorded_message(result_dir: Path, round_num: int, site: str, direction: str) -> dict[str, np.ndarray]:
    """The message a simulator job recorded for ``site`` in ``round_num`` (``direction``: up or down)."""
    with np.load(result_dir / "messages" / f"r{round_num}_{site}_{direction}.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """One torch thread: on a 2-core machine shared with NVFlare's processes, small steps run
    an order of magnitude faster than with torch's default of one thread per core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def phantom_images(tmp_path_factory):
    """A factory of label-free datalists ``{site: [{"image": path, "patient": id}, ...]}`` on a
    small phantom.

    ``phantom_images(patients_per_site)`` generates two sites (``site-1``, ``site-2``) once per
    patient count and session; every ED and ES frame of every patient is an entry.
    """
    from pathlib import Path

    from fedcontrast.data.phantom import synthesize_dataset

    cache: dict[int, dict[str, list[dict]]] = {}

    def make(patients_per_site: int = 1) -> dict[str, list[dict]]:
        if patients_per_site not in cache:
            root = tmp_path_factory.mktemp(f"phantom{patients_per_site}") / "sites"
            synthesize_dataset(root, sites=2, patients_per_site=patients_per_site, seed=0, size="small")
            cache[patients_per_site] = {
                site: [
                    {"image": str(p), "patient": p.parent.name}
                    for p in sorted(Path(root, site).glob("*/*_frame[0-9][0-9].nii.gz"))
                ]
                for site in ("site-1", "site-2")
            }
        return cache[patients_per_site]

    return make


@pytest.fixture(scope="session")
def site_splits(tmp_path_factory):
    """Split folder of a 2-site phantom (4 patients a site): per site 1 labelled, 5 unlabelled
    and 2 test volumes (``site-1.json``, ``site-2.json``), generated once per session."""
    from fedcontrast.demo import prepare_data

    return prepare_data(tmp_path_factory.mktemp("site-splits"), sites=2, patients_per_site=4, seed=0)


@pytest.fixture(scope="session")
def tiny_fcl_config() -> dict:
    """FCL shrunk for the tiny phantom: what the simulator and POC jobs run."""
    from fedcontrast.nets.presets import network_preset

    return {
        "bundle": network_preset("tiny", roi_size=[32, 32]),
        "batch_size": 2,
        "head_hidden": 32,
        "features_per_partition": 3,
        "local_samples": 2,
        "remote_samples": 2,
    }


@pytest.fixture(scope="session")
def tiny_fclopt_config() -> dict:
    """FCLOpt (and its PTNU/DP variants) shrunk for the tiny phantom, seed 5."""
    from fedcontrast.nets.presets import network_preset

    return {
        "bundle": network_preset("tiny", roi_size=[32, 32]),
        "batch_size": 2,
        "head_hidden": 16,
        "predictor_hidden": 16,
        "embedding_dim": 16,
        "features_per_partition": 2,
        "remote_samples": 2,
        "momentum": 0.9,
        "seed": 5,
    }


@pytest.fixture(scope="session")
def venv_without_fedcontrast(tmp_path_factory) -> Callable[[str], Path]:
    """A factory of fresh virtual environments that see this one's packages but not fedcontrast.

    ``make(name)`` returns the new environment's folder (``bin/python``, no pip of its own: its
    ``python -m pip`` is this environment's). This environment's site-packages are on its path
    as a plain folder: their ``.pth`` files, among them an editable install of the checkout, are
    not processed, so fedcontrast is importable there only once something installs it. Seconds
    and offline, where a venv with its own dependencies would take minutes and the network.
    """

    def make(name: str) -> Path:
        root = tmp_path_factory.mktemp(name) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        out = subprocess.run(
            [root / "bin" / "python", "-c", code], check=True, capture_output=True, text=True
        )
        shared = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        (Path(out.stdout.strip()) / "shared_dependencies.pth").write_text("\n".join(shared) + "\n")
        return root

    return make


@pytest.fixture(scope="session")
def env_outside_checkout() -> dict[str, str]:
    """This process's environment without anything that points into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDCONTRAST_BUNDLE_DIR")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def run_checked(cmd: list, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run ``cmd`` in ``cwd``; its stdout, or a test failure with the end of its output."""
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@pytest.fixture(scope="session")
def run_ok() -> Callable[..., str]:
    """:func:`run_checked`, for tests that run commands in another environment."""
    return run_checked


def inline_pool(monkeypatch, result: Callable | None = None) -> list[tuple[str, Any]]:
    """Make ``fedcontrast.bench.protocol`` run its units in this process instead of spawning workers.

    Each submission (unwrapped from :func:`~fedcontrast.bench.protocol.run_unit`) is recorded
    as ``(function name, its unit)`` (the unit is the second argument: a fine-tuning unit, or a
    pre-training unit's method name) in the returned list. The future's value is
    ``result(fn, args)``, by default ``fn(*args)`` (real work, in this process).
    """
    from concurrent.futures import Future

    from fedcontrast.bench import protocol

    submitted: list[tuple[str, Any]] = []

    class InlinePool:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            if fn is protocol.run_unit:  # the worker-side wrapper: record the unit it runs
                fn, *args = args
            submitted.append((fn.__name__, args[1]))
            future = Future()
            future.set_result(result(fn, args) if result else fn(*args))
            return future

    monkeypatch.setattr(protocol, "ProcessPoolExecutor", InlinePool)
    return submitted
