"""The server's record of a run: payload bytes and the sites' metrics, round by round.

Bytes are counted with :func:`fedcontrast.methods.base.count_bytes` (``ndarray.nbytes``
of every message entry, by kind), the one byte counter of the project, for every
message the server sends (``down``) and receives (``up``), as it travels: with a reduced
``transfer`` precision the networks are counted as encoded
(:func:`fedcontrast.methods.transfer.encode`, what the quantisation filters put on the wire).
Everything is written after each round, so a run that stops early still leaves its record:

- ``bytes.json``: ``{"counter", "records": [{"round", "site", "direction", "weights",
  "target", "features", "stats", "total"}], "totals": {direction: {kind: bytes}},
  "per_site": {site: {direction: {kind: bytes}}}}``;
- ``metrics.json``: ``{"records": [{"round", "site", "num_samples", "metrics": {...}}]}``;
- TensorBoard scalars in ``tensorboard/``: ``bytes/<direction>/<kind>`` (all sites, per
  round), ``bytes_per_site/<site>/<direction>``, and ``<metric>/<site>`` for every site metric.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcontrast.methods.base import KINDS, Message, count_bytes
from fedcontrast.methods.transfer import PRECISIONS, encode

DIRECTIONS: tuple[str, ...] = ("down", "up")
BYTES_FILE = "bytes.json"
METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"


class RunLedger:
    """Bytes per round, site, direction and kind, and the sites' metrics per round.

    Args:
        out_dir: where ``bytes.json``, ``metrics.json`` and ``tensorboard/`` are written.
        tensorboard: also write TensorBoard scalars.
        transfer: the precision the networks travel in (:data:`~fedcontrast.methods.transfer.PRECISIONS`).
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, transfer: str = "float32"):
        if transfer not in PRECISIONS:
            raise ValueError(f"transfer must be one of {PRECISIONS}, got {transfer!r}")
        self.transfer = transfer
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.bytes: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR))

    def record_message(self, round_num: int, site: str, direction: str, message: Message) -> dict[str, int]:
        """Count one message sent to (``down``) or received from (``up``) ``site``, as encoded for
        the wire (``message`` is the decoded form); returns bytes by kind."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        counts = count_bytes(encode(message, self.transfer))
        self.bytes.append(
            {
                "round": round_num,
                "site": site,
                "direction": direction,
                **counts,
                "total": sum(counts.values()),
            }
        )
        return counts

    def record_metrics(
        self, round_num: int, site: str, metrics: Mapping[str, float], num_samples: int
    ) -> None:
        """The metrics ``site`` reported for ``round_num``."""
        self.metrics.append(
            {"round": round_num, "site": site, "num_samples": num_samples, "metrics": dict(metrics)}
        )

    def totals(self) -> dict[str, Any]:
        """Bytes summed over the run: ``{"totals": {direction: {kind: n}}, "per_site": {site: ...}}``."""
        totals: dict[str, dict[str, int]] = {d: dict.fromkeys((*KINDS, "total"), 0) for d in DIRECTIONS}
        per_site: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: {d: dict.fromkeys((*KINDS, "total"), 0) for d in DIRECTIONS}
        )
        for record in self.bytes:
            for key in (*KINDS, "total"):
                totals[record["direction"]][key] += record[key]
                per_site[record["site"]][record["direction"]][key] += record[key]
        return {"totals": totals, "per_site": dict(per_site)}

    def end_round(self, round_num: int) -> None:
        """Write the JSON files and this round's TensorBoard scalars."""
        _write_json(
            self.out_dir / BYTES_FILE,
            {
                "counter": "ndarray.nbytes by kind (fedcontrast.methods.base.count_bytes)",
                "transfer": self.transfer,
                "records": self.bytes,
            }
            | self.totals(),
        )
        _write_json(self.out_dir / METRICS_FILE, {"records": self.metrics})
        if self._writer is None:
            return
        this_round = [r for r in self.bytes if r["round"] == round_num]
        for direction in DIRECTIONS:
            records = [r for r in this_round if r["direction"] == direction]
            for kind in (*KINDS, "total"):
                self._writer.add_scalar(f"bytes/{direction}/{kind}", sum(r[kind] for r in records), round_num)
            for r in records:
                self._writer.add_scalar(f"bytes_per_site/{r['site']}/{direction}", r["total"], round_num)
        for record in (r for r in self.metrics if r["round"] == round_num):
            for name, value in record["metrics"].items():
                self._writer.add_scalar(f"{name}/{record['site']}", value, round_num)
        self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_json(path: Path, content: Any) -> None:
    """Write ``content`` as JSON, replacing ``path`` only once the new file is complete."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)
