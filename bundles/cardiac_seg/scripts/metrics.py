"""Per-class metric handlers: a Hausdorff distance in millimetres, and per-class scalars and reports."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric


class HausdorffDistanceMM(IgniteMetricHandler):
    """Percentile Hausdorff distance per class in millimetres (MONAI ``HausdorffDistanceMetric``).

    MONAI's ``HausdorffDistance`` handler measures in voxels; this one passes each volume's
    voxel spacing (from the label's affine) so that anisotropic volumes are measured in mm.

    Args:
        percentile: e.g. 95 for HD95.
        include_background: whether channel 0 is measured.
        output_transform: engine output -> ``(y_pred, y)``: lists of one-hot ``(C, H, W, D)``
            tensors, ``y`` as ``MetaTensor`` carrying the affine.
        save_details: keep the per-volume, per-class values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        percentile: float = 95.0,
        include_background: bool = False,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = HausdorffDistanceMetric(include_background=include_background, percentile=percentile)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def update(self, output: Sequence) -> None:
        """Measure each volume of the batch with its own spacing."""
        y_pred, y = output
        for pred, label in zip(y_pred, y):
            spacing = label.pixdim.tolist() if isinstance(label, MetaTensor) else None
            self.metric_fn(pred.unsqueeze(0), label.unsqueeze(0), spacing=spacing)


def _finite_mean(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over ``dim`` of the finite entries (NaN where there is none)."""
    values = values.float().masked_fill(~torch.isfinite(values), float("nan"))
    return values.nanmean() if dim is None else values.nanmean(dim=dim)


def _number(value: torch.Tensor) -> float | None:
    """A JSON-safe float (``None`` for NaN or infinity)."""
    value = float(value)
    return value if math.isfinite(value) else None


class PerClassMetrics:
    """Per-class scalars from per-volume metric details, plus an optional per-volume CSV and summary JSON.

    At the end of each evaluation epoch, for each metric with saved details
    (``engine.state.metric_details[name]``, shape ``(volumes, classes)``), adds
    ``engine.state.metrics[f"{name}_{class}"]``: the mean over volumes of the finite values,
    so that ``StatsHandler`` and ``TensorBoardStatsHandler`` attached after this handler log them.
    With ``output_dir`` it also writes ``per_volume.csv`` (one row per volume: file, each
    metric per class and its class mean) and ``summary.json`` (per metric: per-class means
    and their mean; ``null`` where undefined).

    Args:
        class_names: names of the measured classes in channel order (background excluded).
        output_dir: folder for the report files; ``None`` writes nothing.
        image_key: batch key whose ``MetaTensor`` meta names the volume's file.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | os.PathLike | None = None,
        image_key: str = "image",
    ) -> None:
        self.class_names = list(class_names)
        self.output_dir = Path(output_dir) if output_dir else None
        self.image_key = image_key
        self._files: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Register the collection and reporting events on ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._files.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_files)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _collect_files(self, engine: Engine) -> None:
        for item in engine.state.batch:
            image = item.get(self.image_key)
            meta = image.meta if isinstance(image, MetaTensor) else {}
            self._files.append(str(meta.get("filename_or_obj", len(self._files))))

    def _complete(self, engine: Engine) -> None:
        details = {
            name: torch.as_tensor(values).reshape(len(self._files), -1).cpu()
            for name, values in engine.state.metric_details.items()
        }
        for name, values in details.items():
            if values.shape[1] != len(self.class_names):
                raise ValueError(
                    f"metric {name!r} has {values.shape[1]} classes, class_names {len(self.class_names)}"
                )
            for cls, value in zip(self.class_names, _finite_mean(values, dim=0)):
                engine.state.metrics[f"{name}_{cls}"] = value.item()
        if self.output_dir is not None:
            self._write_reports(details)

    def _write_reports(self, details: dict[str, torch.Tensor]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        columns = [f"{name}_{cls}" for name in details for cls in [*self.class_names, "mean"]]
        with open(self.output_dir / "per_volume.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", *columns])
            for i, file in enumerate(self._files):
                row = []
                for values in details.values():
                    row += [*values[i].tolist(), _finite_mean(values[i]).item()]
                writer.writerow([file, *row])
        summary: dict = {"volumes": len(self._files)}
        for name, values in details.items():
            per_class = _finite_mean(values, dim=0)
            summary[name] = {cls: _number(v) for cls, v in zip(self.class_names, per_class)}
            summary[name]["mean"] = _number(_finite_mean(per_class))
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
