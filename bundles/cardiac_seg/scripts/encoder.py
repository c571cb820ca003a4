"""Pre-trained encoder files: the encoder's weights with the voxel grid and network options they fit.

A file is a ``torch.save``-d dict ``{"format": FORMAT, "options": {...}, "state_dict": {...}}``:
``state_dict`` holds the encoder's own keys (as in ``network.encoder.state_dict()``) and
``options`` the values of the config's ``encoder_options`` (spatial dims, channels, widths,
voxel spacing, in-plane size) it was pre-trained with. Loading it into a network built with
other options is refused naming each differing option. A plain state dict (an older file)
still loads, with a warning that its grid cannot be checked.

Plain PyTorch: the bundle runs without fedcontrast installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Value of the ``format`` entry of an encoder file written by :func:`save_encoder`.
FORMAT = "cardiac_seg-encoder/1"


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, so that config values compare and pickle as plain types."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """How ``state``'s keys and shapes differ from ``expected``'s ("" when they match).

    Lists the missing keys, the unexpected keys and the shape mismatches, each sorted: the one
    strict-load check of encoder files and decoder checkpoints.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if not (missing or unexpected or wrong_shape):
        return ""
    return f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {wrong_shape}"


def check_encoder_state(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the keys unless ``state`` fits ``network.encoder``."""
    expected = network.encoder.state_dict()
    problem = state_mismatch(expected, state)
    if problem:
        hint = ""
        if any(k.startswith("encoder.") for k in set(state) - set(expected)):
            hint = " (keys start with 'encoder.': a full network state dict? strip that prefix)"
        raise ValueError(f"{source} does not match the network's encoder{hint}: {problem}")


def save_encoder(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, options: Mapping[str, Any]
) -> None:
    """Write an encoder file: ``state`` (the encoder's own keys) and the ``options`` it fits.

    Args:
        state: encoder state dict (keys as in ``network.encoder.state_dict()``).
        path: the file to write.
        options: the config's ``encoder_options`` of the network the encoder was trained in.
    """
    tensors = {k: torch.as_tensor(v).detach().cpu() for k, v in state.items()}
    torch.save({"format": FORMAT, "options": _plain(options), "state_dict": tensors}, path)


def read_encoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state dict and recorded options (None for a plain state dict) of an encoder file.

    Raises:
        ValueError: the file holds neither an encoder file nor a state dict of tensors.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    options = None
    if isinstance(data, Mapping) and data.get("format") == FORMAT:
        options, data = dict(data["options"]), data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        hint = ""
        if isinstance(data, Mapping) and "contains" in data:  # another self-describing checkpoint
            hint = f" (a {data.get('format')} checkpoint holding {data['contains']}, not an encoder file)"
        raise ValueError(
            f"pretrained encoder {path}: expected a state dict of tensors, got {type(data)}{hint}"
        )
    return dict(data), options


def load_pretrained_encoder(
    network: torch.nn.Module, path: str | os.PathLike, options: Mapping[str, Any] | None
) -> list[str]:
    """Load an encoder file into ``network.encoder``, refusing another grid or any key mismatch.

    Args:
        network: a bundle network (its ``encoder`` attribute receives the weights).
        path: an encoder file (:func:`save_encoder`) or a plain encoder state dict.
        options: the ``encoder_options`` of ``network``'s config; None skips the option check.

    Returns:
        The loaded keys, sorted.

    Raises:
        ValueError: an option recorded in the file differs from ``options`` (each is named with
            both values), or the keys or shapes differ from ``network.encoder``'s (listed).
    """
    state, recorded = read_encoder(path)
    if recorded is None:
        logger.warning("pretrained encoder %s records no voxel grid or network options: not checked", path)
    elif options is not None:
        wanted = _plain(options)
        differing = [
            f"{key}: pre-trained {recorded[key]!r}, this network {wanted.get(key)!r}"
            for key in sorted(recorded)
            if recorded[key] != wanted.get(key)
        ]
        if differing:
            raise ValueError(
                f"pretrained encoder {path} was pre-trained on another grid or network; "
                f"differing options: {'; '.join(differing)}"
            )
    check_encoder_state(network, state, f"pretrained encoder {path}")
    network.encoder.load_state_dict(state, strict=True)
    loaded = sorted(state)
    logger.info("loaded %d encoder tensors from %s: %s", len(loaded), path, loaded)
    return loaded
