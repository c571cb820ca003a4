"""The cost of the federation itself: an NVFlare simulator round against the same steps in PyTorch.

The same FCL pre-training (same sites, data, config) runs R1 and R2 rounds, once through the
NVFlare simulator (``fedcontrast.flare.jobs``) and once in process
(``fedcontrast.methods.runner.run_in_process``: the same trainer and strategy calls, no
messaging). The per-round wall time is the difference divided by R2 - R1, which removes
start-up costs; their ratio is the overhead of the federation layer. Training throughput is
the volumes each site processes per round divided by the in-process round time.

    python benchmarks/federation_cost.py [--out benchmarks/results/federation_cost.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedcontrast.bench.report import environment
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import LABELS, synthesize_dataset
from fedcontrast.data.readers import read_acdc
from fedcontrast.data.splits import write_site_splits
from fedcontrast.flare.jobs import build_job, datalist_template, run_simulator
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.volumes import pretraining_entries

SITES = 2
NETWORK = {"init_filters": 8, "blocks_down": [1, 2, 2], "inplane_spacing": 3.0, "roi_size": [48, 48]}
CONFIG = {"bundle": NETWORK, "local_epochs": 1, "batch_size": 4, "seed": 0}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/federation_cost.json"))
    parser.add_argument("--rounds", type=int, nargs=2, default=[1, 3], metavar=("R1", "R2"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    r1, r2 = args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_dataset(root / "data", sites=SITES, patients_per_site=4, seed=0, size="small")
        write_site_splits(read_acdc(root / "data"), LABELS, root / "splits", 1, 1, seed=0)
        datalists = {f"site-{i}": load_site_datalist(root / "splits" / f"site-{i}.json") for i in (1, 2)}
        entries = {site: pretraining_entries(d) for site, d in datalists.items()}

        def simulator(rounds: int) -> None:
            job = build_job(
                "fcl", CONFIG, rounds, SITES, datalist_template(root / "splits"), name=f"fcl{rounds}"
            )
            run_simulator(job, root / f"sim{rounds}", SITES)

        sim = {r: timed(lambda r=r: simulator(r)) for r in (r1, r2)}
        local = {r: timed(lambda r=r: run_in_process("fcl", CONFIG, entries, r)) for r in (r1, r2)}
    sim_round = (sim[r2] - sim[r1]) / (r2 - r1)
    local_round = (local[r2] - local[r1]) / (r2 - r1)
    volumes = {site: len(e) for site, e in entries.items()}
    result = {
        "what": "FCL pre-training, 2 sites, small phantom; simulator vs in-process, same steps",
        "config": {**CONFIG, "sites": SITES, "rounds": [r1, r2]},
        "environment": environment(),
        "simulator_wall_s": sim,
        "in_process_wall_s": local,
        "simulator_round_s": sim_round,
        "in_process_round_s": local_round,
        "overhead_ratio": sim_round / local_round,
        "simulator_startup_s": sim[r1] - r1 * sim_round,
        # the in-process round trains the sites one after the other: per site it takes round_s / sites
        "throughput_volumes_per_s_per_site": {s: n / (local_round / SITES) for s, n in volumes.items()},
        "gpu": "no GPU was lent to this task; CPU only",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("simulator_round_s", "in_process_round_s", "overhead_ratio")}))


if __name__ == "__main__":
    main()
