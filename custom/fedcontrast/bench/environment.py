"""Where a benchmark ran: versions, processor, GPU and date, recorded by the run itself.

A run folder of ``fedcontrast bench`` may be filled by several calls, on different machines
(a later call adds a column or the missing units). Each call that runs units appends this
machine's :func:`environment` to the folder's ``environment.json``
(:func:`record_call`), and the report describes the run with :func:`run_environment`: one
value per field where every call agrees, ``"A / B"`` where they differ, so a grid whose
units ran on two CPUs says so.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: The run folder's file: ``{"calls": [environment + {"started", "units"}, ...]}``.
ENVIRONMENT_FILE = "environment.json"


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """This machine now: python, torch, monai, nvflare, numpy versions, cpu, gpu (or None), date."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": _installed("monai"),
        "nvflare": _installed("nvflare"),
        "numpy": _installed("numpy"),
        "cpu": _cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(UTC).date().isoformat(),
    }


def record_call(run_dir: Path, units: int) -> None:
    """Append this machine's environment, the UTC start time and the ``units`` this call runs
    to ``run_dir/environment.json``."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    calls = json.loads(path.read_text())["calls"] if path.exists() else []
    started = datetime.now(UTC).isoformat(timespec="seconds")
    calls.append({**environment(), "started": started, "units": units})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"calls": calls}, indent=1))
    tmp.replace(path)


def run_environment(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The environment of the calls that filled ``run_dirs`` (one run, or the folders a report
    merges), or this machine's now, marked so, when none of them recorded one.

    Each field of :func:`environment` holds its value where every call agrees and the distinct
    values joined by ``" / "`` where they differ; ``date`` is the first and last day;
    ``calls`` counts the recorded calls.
    """
    calls = [
        call
        for run_dir in run_dirs
        if (Path(run_dir) / ENVIRONMENT_FILE).exists()
        for call in json.loads((Path(run_dir) / ENVIRONMENT_FILE).read_text())["calls"]
    ]
    if not calls:
        return {**environment(), "recorded": "when the report was written (the run saved none)"}
    merged: dict[str, Any] = {}
    for key in (k for k in calls[0] if k not in ("started", "units", "date")):
        values = list(dict.fromkeys(c.get(key) for c in calls))
        merged[key] = values[0] if len(values) == 1 else " / ".join(str(v) for v in values)
    dates = sorted(c["date"] for c in calls)
    merged["date"] = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    merged["calls"] = len(calls)
    return merged
