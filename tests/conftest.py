"""Suite-wide test settings."""

import os

import pytest
import torch


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
    """A factory of image-only datalists ``{site: [{"image": path}, ...]}`` on a small phantom.

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
                site: [{"image": str(p)} for p in sorted(Path(root, site).glob("*/*_frame[0-9][0-9].nii.gz"))]
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
    return {
        "bundle": {"init_filters": 4, "blocks_down": [1, 1, 1], "roi_size": [32, 32]},
        "batch_size": 2,
        "head_hidden": 32,
        "features_per_partition": 3,
        "local_samples": 2,
        "remote_samples": 2,
    }
