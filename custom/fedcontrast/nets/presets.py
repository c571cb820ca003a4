"""Named small networks: bundle config overrides for the bench, the demo, the benchmarks and the tests.

A plain-Python module (no torch or MONAI import), so that the command line stays quick to start.
"""

from __future__ import annotations

import copy
from typing import Any

#: Named bundle overrides for small networks, the one registry the bench, the demo, the
#: benchmarks and the tests take them from (:func:`network_preset`):
#:
#: - ``small``: the bench's and the demo's network and grid for the phantom at size "small"
#:   (SegResNetDS with 8 filters and 3 levels, 3 mm in-plane, a 48 x 48 crop, 48 x 48 x 8 patches);
#: - ``tiny``: the smallest network (4 filters, 3 levels of one block), for tests and CI;
#: - ``tiny_phantom``: ``tiny`` on the small phantom's grid (3 mm in-plane, 48 x 48 crop,
#:   32 x 32 x 4 patches).
NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "init_filters": 8,
        "blocks_down": [1, 2, 2],
        "inplane_spacing": 3.0,
        "roi_size": [48, 48],
        "patch_size": [48, 48, 8],
    },
    "tiny": {"init_filters": 4, "blocks_down": [1, 1, 1]},
}
NETWORK_PRESETS["tiny_phantom"] = {
    **NETWORK_PRESETS["small"],
    **NETWORK_PRESETS["tiny"],
    "patch_size": [32, 32, 4],
}


def network_preset(name: str, **changes: Any) -> dict[str, Any]:
    """A fresh copy of the bundle overrides :data:`NETWORK_PRESETS` ``[name]``, ``changes`` applied
    (a changed key keeps its place, a new one comes last).

    Raises:
        ValueError: an unknown ``name`` (the known ones are listed).
    """
    if name not in NETWORK_PRESETS:
        raise ValueError(f"unknown network preset {name!r}; expected one of {sorted(NETWORK_PRESETS)}")
    return {**copy.deepcopy(NETWORK_PRESETS[name]), **changes}
