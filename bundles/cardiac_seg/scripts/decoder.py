"""Decoder-stage checkpoints: the encoder and the pre-trained decoder blocks, loaded strictly.

The network is MONAI ``SegResNetDS``: ``up_layers[i]`` (``upsample``, ``blocks``, ``head``)
climbs one level. A decoder stage (local contrastive pre-training on a frozen encoder) trains
the **decoder blocks** of the first ``k`` levels: the ``up_layers.<i>.upsample.*`` and
``up_layers.<i>.blocks.*`` entries for ``i < k`` (:func:`decoder_block_keys`); the levels'
``head`` entries, the remaining levels and the output head are not pre-trained.

A checkpoint is a ``torch.save``-d dict that says what it holds::

    {"format": "fedcontrast.pretrained_network", "version": 1,
     "contains": ["encoder", "decoder_blocks"],    # "encoder" only when it was available
     "decoder_levels": k,                          # up-sampling levels pre-trained
     "encoder": {key: tensor},                     # keys as in network.encoder.state_dict()
     "decoder": {key: tensor},                     # network keys up_layers.<i>.{upsample,blocks}.*
     "stages": [{"stage": "encoder", ...}, {"stage": "decoder", ...}],  # provenance
     "bundle": {...}}                              # the bundle overrides it was built with

The train config loads one with ``pretrained_decoder`` (:func:`load_pretrained_decoder`).
Plain PyTorch: the bundle runs without fedcontrast installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from scripts.encoder import check_encoder_state, state_mismatch

logger = logging.getLogger(__name__)

#: ``format`` value of a decoder-stage checkpoint.
CHECKPOINT_FORMAT = "fedcontrast.pretrained_network"
CHECKPOINT_VERSION = 1


def num_levels(network: torch.nn.Module) -> int:
    """Up-sampling levels of a bundle network (``len(network.up_layers)``)."""
    return len(network.up_layers)


def decoder_block_keys(network: torch.nn.Module, levels: int) -> list[str]:
    """Network state-dict keys of the decoder blocks of the first ``levels`` levels, sorted.

    ``up_layers.<i>.upsample.*`` and ``up_layers.<i>.blocks.*`` for ``i < levels`` (never ``head``).
    """
    prefixes = tuple(f"up_layers.{i}.{part}." for i in range(levels) for part in ("upsample", "blocks"))
    return sorted(k for k in network.state_dict() if k.startswith(prefixes))


def read_decoder_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a decoder-stage checkpoint.

    Raises:
        ValueError: the file is not such a checkpoint (e.g. a plain encoder state dict), or
            is of another version; the message names the file.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = " (a plain state dict: an encoder file goes to pretrained_encoder)"
        raise ValueError(f"pretrained decoder {path}: not a {CHECKPOINT_FORMAT} checkpoint{hint}")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"pretrained decoder {path}: version {obj.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    return dict(obj)


def load_pretrained_decoder(
    network: torch.nn.Module, path: str | os.PathLike, load_encoder: bool = True
) -> list[str]:
    """Load a decoder-stage checkpoint's decoder blocks (and encoder) into ``network``, strictly.

    The decoder entries must be exactly :func:`decoder_block_keys` of the checkpoint's
    ``decoder_levels`` with the network's shapes; anything else is refused with a message
    that lists the missing, unexpected and mis-shaped keys. The rest of the decoder and
    the output head keep their (random) initialisation.

    Args:
        network: a bundle network.
        path: a decoder-stage checkpoint (see the module docstring).
        load_encoder: True: load the checkpoint's encoder too (it must hold one);
            False: the network's encoder was loaded otherwise (``pretrained_encoder``), and when
            the checkpoint holds an encoder it must equal that one (decoder blocks trained
            against another encoder are refused, the differing keys listed).

    Returns:
        The loaded network keys (``encoder.*`` and ``up_layers.*``), sorted.
    """
    checkpoint = read_decoder_checkpoint(path)
    levels = int(checkpoint["decoder_levels"])
    if not 1 <= levels <= num_levels(network):
        raise ValueError(
            f"pretrained decoder {path}: {levels} decoder level(s), but the network has {num_levels(network)}"
        )
    decoder = checkpoint["decoder"]
    full = network.state_dict()
    expected = {k: full[k] for k in decoder_block_keys(network, levels)}
    problem = state_mismatch(expected, decoder)
    if problem:
        raise ValueError(
            f"pretrained decoder {path} does not match the network's first {levels} decoder level(s): "
            f"{problem}"
        )
    encoder = checkpoint.get("encoder")
    loaded = []
    if load_encoder:
        if encoder is None:
            raise ValueError(
                f"pretrained decoder {path} holds no encoder (contains {checkpoint['contains']}); "
                "give the encoder it was trained against as pretrained_encoder"
            )
        check_encoder_state(network, encoder, f"pretrained decoder {path}: its encoder")
        network.encoder.load_state_dict(encoder, strict=True)
        loaded += [f"encoder.{k}" for k in encoder]
    elif encoder is not None:
        current = network.encoder.state_dict()
        check_encoder_state(network, encoder, f"pretrained decoder {path}: its encoder")
        differ = sorted(k for k in encoder if not torch.equal(encoder[k], current[k].cpu()))
        if differ:
            raise ValueError(
                f"pretrained decoder {path} was trained against another encoder than the one loaded "
                f"(pretrained_encoder); differing keys {differ}"
            )
    incompatible = network.load_state_dict(decoder, strict=False)
    if incompatible.unexpected_keys:  # excluded by the key check above
        raise ValueError(f"pretrained decoder {path}: unexpected keys {incompatible.unexpected_keys}")
    loaded += list(decoder)
    logger.info(
        "loaded %d decoder tensors (%d level(s)) from %s%s",
        len(decoder),
        levels,
        path,
        " with its encoder" if load_encoder else "",
    )
    return sorted(loaded)
