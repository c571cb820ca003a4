"""The network checkpoint of ``inference.json`` and ``evaluate.json`` (``ckpt_path``), checked first.

MONAI's ``CheckpointLoader`` reports a file that is not a checkpoint with torch's "weights only
load failed" advice (re-load it unsafely), and an encoder-only file with a long key listing that
names no file. :class:`NetworkCheckpointLoader` reads the file itself and refuses, naming the file
and what it expected instead: no file, not a checkpoint of tensors, a pre-trained encoder file or
another self-describing checkpoint (a decoder stage's), or a state dict of another network.

Plain PyTorch and MONAI: the bundle runs without fedcontrast installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from .encoder import FORMAT as ENCODER_FORMAT
from .encoder import state_mismatch

#: What ``ckpt_path`` must name, said in every refusal.
EXPECTED = (
    "expected the whole segmentation network's state dict (the bundle's models/model.pt, a "
    "training run's model.pt or a federated run's global_model.pt)"
)


def read_network_state(path: str | os.PathLike, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in the checkpoint ``path``, checked against ``network``'s keys and shapes.

    Accepts a plain state dict or ``{"model": state dict}`` (MONAI's ``CheckpointSaver``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` is not a ``torch.save`` file of tensors, is an encoder file or another
            self-describing checkpoint, or its keys or shapes differ from ``network``'s; the
            message names the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {path}: no such file; {EXPECTED}")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure; torch's own text (not chained) advises an unsafe re-load
        what = "not a PyTorch checkpoint file"
        if "Unsupported global" in str(err):
            what = "a pickled Python object (e.g. torch.save(model)), not a state dict of tensors"
        raise ValueError(f"ckpt_path {path}: {what} (torch.load: {type(err).__name__}); {EXPECTED}") from None
    if isinstance(data, Mapping) and data.get("format") == ENCODER_FORMAT:
        raise ValueError(
            f"ckpt_path {path}: a pre-trained encoder file (the encoder only, no decoder or output "
            f"layer; training's pretrained_encoder takes it); {EXPECTED}"
        )
    if isinstance(data, Mapping) and "contains" in data and "format" in data:
        raise ValueError(
            f"ckpt_path {path}: a {data['format']} checkpoint holding {list(data['contains'])}, "
            f"not a whole network; {EXPECTED}"
        )
    if isinstance(data, Mapping) and set(data) == {"model"}:
        data = data["model"]
    if (
        not isinstance(data, Mapping)
        or not data
        or not all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        raise ValueError(
            f"ckpt_path {path}: holds {type(data).__name__}, not a state dict of tensors; {EXPECTED}"
        )
    expected = network.state_dict()
    problem = state_mismatch(expected, data)
    if problem:
        hint = ""
        if not set(data) & set(expected) and all(f"encoder.{k}" in expected for k in data):
            hint = " (the encoder's keys alone: an encoder-only state dict)"
        raise ValueError(
            f"ckpt_path {path}: does not fit this network{hint}: {problem} (were the network options, "
            f"e.g. init_filters or the label set, the ones it was trained with?); {EXPECTED}"
        )
    return dict(data)


class NetworkCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` of one network that checks ``load_path`` first
    (:func:`read_network_state`), so a wrong file is refused with a message naming it."""

    def __call__(self, engine: Any) -> None:
        """Check the file against the network in ``load_dict``, then load it as MONAI does."""
        (network,) = self.load_dict.values()
        read_network_state(self.load_path, network)
        super().__call__(engine)
