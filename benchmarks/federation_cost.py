"""The cost of the federation itself: an NVFlare simulator round against the same steps in PyTorch.

The same FCL pre-training (same sites, data, config) runs R1 and R2 rounds, once through the
NVFlare simulator (``fedcontrast.flare.jobs``) and once in process
(``fedcontrast.methods.runner.run_in_process``: the same trainer and strategy calls, no
messaging, one PyTorch thread, the sites one after the other). The per-round wall time is the
difference divided by R2 - R1, which removes start-up costs. Reported for 2 and 4 sites:

- ``overhead_ratio``: simulator round / in-process round;
- ``fixed_overhead_s``: simulator round - in-process round, the seconds per round the
  federation layer adds (the simulated sites share the same cores, so their training takes
  about as long in parallel as the in-process sites take one after the other);
- ``server_timing``: the controller's own record of the R2-round run (``metrics.json``,
  site ``server``): per round, the wall time from sending the tasks until every update was
  in, the slowest site's ``local_round`` and their difference (``median_overhead_s``): the
  federation layer's share measured inside one run, so less exposed to other load on the
  machine than the difference of two runs;
- ``peak_rss_mb``: the largest resident memory of each site's worker process and of the
  simulator's server process, sampled every 0.2 s while the R2-round run lasts.

With ``--defaults`` the 2-site simulator is also run with NVFlare's own settings
(``task_request_interval`` 2 s, ``task_check_period`` 0.5 s, one PyTorch thread per core in
every site), the figures this project had before the settings of ``fedcontrast.flare``.

    python benchmarks/federation_cost.py [--sites 2 4] [--defaults] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

from fedcontrast.bench.environment import environment
from fedcontrast.bench.report import output_file
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import LABELS, synthesize_dataset
from fedcontrast.data.readers import read_acdc
from fedcontrast.data.splits import site_names, write_site_splits
from fedcontrast.flare.controller import TASK_CHECK_PERIOD
from fedcontrast.flare.jobs import (
    SIMULATOR_RESULT_DIR,
    TASK_REQUEST_INTERVAL,
    build_job,
    datalist_template,
    run_simulator,
)
from fedcontrast.flare.ledger import METRICS_FILE
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.volumes import pretraining_entries

NETWORK = {"init_filters": 8, "blocks_down": [1, 2, 2], "inplane_spacing": 3.0, "roi_size": [48, 48]}
CONFIG = {"bundle": NETWORK, "local_epochs": 1, "batch_size": 4, "seed": 0}
#: NVFlare's own settings (what ``--defaults`` measures).
NVFLARE_DEFAULTS = {
    "task_request_interval": 2.0,
    "task_check_period": 0.5,
    "threads_per_site": os.cpu_count(),
}


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def process_label(process: psutil.Process) -> str | None:
    """``site-k`` for a simulator worker, ``server`` for the simulator itself, else None."""
    try:
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if match := re.search(r"--client (\S+)", cmdline):
        return match.group(1)
    if "fedcontrast.flare.simulator" in cmdline:
        return "server"
    return None


@contextmanager
def peak_memory(period: float = 0.2) -> Iterator[dict[str, float]]:
    """Sample this process's descendants every ``period`` s; yields ``{label: peak RSS in MB}``
    (filled in when the block ends; ``all`` is the peak of the sum over every descendant)."""
    peaks: dict[str, float] = defaultdict(float)
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            total = 0.0
            by_label: dict[str, float] = defaultdict(float)
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                if label := process_label(child):
                    by_label[label] += rss
            for label, rss in by_label.items():
                peaks[label] = max(peaks[label], rss)
            peaks["all"] = max(peaks["all"], total)
            stop.wait(period)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.update({k: round(v, 1) for k, v in sorted(peaks.items())})


def measure(
    sites: int, rounds: tuple[int, int], root: Path, settings: dict[str, Any] | None
) -> dict[str, Any]:
    """Simulator and in-process rounds of FCL on ``sites`` phantom sites (``settings``: NVFlare's own)."""
    r1, r2 = rounds
    data = root / f"data{sites}"
    synthesize_dataset(data / "raw", sites=sites, patients_per_site=4, seed=0, size="small")
    write_site_splits(read_acdc(data / "raw"), LABELS, data / "splits", 1, 1, seed=0)
    names = site_names(sites)
    entries = {s: pretraining_entries(load_site_datalist(data / "splits" / f"{s}.json")) for s in names}
    options = {}
    if settings:
        options = {k: settings[k] for k in ("task_request_interval", "task_check_period")}
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    if settings:
        os.environ["OMP_NUM_THREADS"] = str(settings["threads_per_site"])
    memory: dict[str, float] = {}
    sim: dict[int, float] = {}
    try:
        for r in (r1, r2):
            datalist = datalist_template(data / "splits")
            job = build_job("fcl", CONFIG, r, sites, datalist, name=f"fcl{r}", **options)
            workspace = root / f"sim{sites}_{r}_{bool(settings)}"
            with peak_memory() as peaks:
                sim[r] = timed(lambda job=job, w=workspace: run_simulator(job, w, sites))
            memory = peaks
            records = json.loads((workspace / SIMULATOR_RESULT_DIR / METRICS_FILE).read_text())["records"]
            # the server's own timing of every round after the first (which builds the trainers)
            timing = [m["metrics"] for m in records if m["site"] == "server" and m["round"] > 0]
    finally:
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
    local = {r: timed(lambda r=r: run_in_process("fcl", CONFIG, entries, r)) for r in (r1, r2)}
    sim_round = (sim[r2] - sim[r1]) / (r2 - r1)
    local_round = (local[r2] - local[r1]) / (r2 - r1)
    volumes = {site: len(e) for site, e in entries.items()}
    return {
        "sites": sites,
        "simulator_wall_s": sim,
        "in_process_wall_s": local,
        "simulator_round_s": sim_round,
        "in_process_round_s": local_round,
        "overhead_ratio": sim_round / local_round,
        "fixed_overhead_s": sim_round - local_round,
        "server_timing": {
            "rounds": len(timing),
            "median_round_s": statistics.median(t["round_s"] for t in timing),
            "median_site_train_s": statistics.median(t["site_train_s"] for t in timing),
            "median_overhead_s": statistics.median(t["overhead_s"] for t in timing),
        },
        "simulator_startup_s": sim[r1] - r1 * sim_round,
        "peak_rss_mb": memory,
        # the in-process round trains the sites one after the other: per site it takes round_s / sites
        "throughput_volumes_per_s_per_site": {s: n / (local_round / sites) for s, n in volumes.items()},
    }


def render(result: dict[str, Any]) -> str:
    """The markdown report of a result file."""
    env = result["environment"]
    settings = result["settings"]
    ours = settings["fedcontrast"]
    lines = [
        "# Federation cost: NVFlare simulator round against the same steps in process",
        "",
        f"Written by `python benchmarks/federation_cost.py --defaults` on {env['date']} ({env['cpu']}, "
        f"{result['gpu']}). {result['what']}; rounds {result['config']['rounds']}.",
        "",
        "Settings of `fedcontrast.flare` (NVFlare's default in brackets): "
        + ", ".join(f"{k} {v} ({settings['nvflare_defaults'][k]})" for k, v in ours.items())
        + ".",
        "",
        "| settings | sites | server: round (s) | server: slowest site's training (s) "
        "| server: overhead per round (s) | simulator round (s) | in-process round (s) | ratio "
        "| peak RSS per site (MB) | peak RSS server (MB) | peak RSS all (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        timing, memory = run["server_timing"], run["peak_rss_mb"]
        sites = [v for k, v in memory.items() if k.startswith("site-")]
        lines.append(
            f"| {run['settings']} | {run['sites']} | {timing['median_round_s']:.2f} "
            f"| {timing['median_site_train_s']:.2f} | {timing['median_overhead_s']:.2f} "
            f"| {run['simulator_round_s']:.2f} | {run['in_process_round_s']:.2f} "
            f"| {run['overhead_ratio']:.2f} "
            f"| {max(sites, default=0):.0f} | {memory.get('server', 0):.0f} | {memory.get('all', 0):.0f} |"
        )
    lines += [
        "",
        "The server columns are medians over rounds 1.. of the controller's own timing in one run "
        "(`metrics.json`, site `server`): from sending a round's tasks until every update is in, the "
        "slowest site's `local_round`, and their difference. The simulator/in-process columns are "
        "differences of two whole runs (R2 - R1 rounds) and carry the machine's load between runs.",
        "",
    ] + [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/federation_cost.json"))
    parser.add_argument("--rounds", type=int, nargs=2, default=[1, 3], metavar=("R1", "R2"))
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--defaults", action="store_true", help="also run 2 sites with NVFlare's settings")
    parser.add_argument("--notes", nargs="*", default=[], help="lines for the report (e.g. the load)")
    parser.add_argument("--render", action="store_true", help="only (re)write the report of --out")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.out.read_text())
        result["notes"] = args.notes or result.get("notes", [])
        args.out.write_text(json.dumps(result, indent=1))
        output_file(args.out, ".md").write_text(render(result))
        return
    torch.set_num_threads(1)
    rounds = tuple(args.rounds)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            runs.append({"settings": "fedcontrast", **measure(sites, rounds, Path(tmp), None)})
            print(json.dumps({k: runs[-1][k] for k in ("sites", "simulator_round_s", "in_process_round_s")}))
        if args.defaults:
            runs.append({"settings": "nvflare_defaults", **measure(2, rounds, Path(tmp), NVFLARE_DEFAULTS)})
    result = {
        "what": "FCL pre-training on a small phantom; simulator vs in-process, same steps, per round",
        "config": {**CONFIG, "rounds": list(rounds)},
        "settings": {
            "fedcontrast": {
                "task_request_interval": TASK_REQUEST_INTERVAL,
                "task_check_period": TASK_CHECK_PERIOD,
                "threads_per_site": "cores // sites (at least 1)",
            },
            "nvflare_defaults": NVFLARE_DEFAULTS,
        },
        "environment": environment(),
        "runs": runs,
        "gpu": "no GPU was lent to this task; CPU only",
    }
    result["notes"] = args.notes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    output_file(args.out, ".md").write_text(render(result))


if __name__ == "__main__":
    main()
