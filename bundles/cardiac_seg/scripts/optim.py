"""The optimiser's parameter groups: the encoder can fine-tune at a fraction of the learning rate.

Referenced from ``train.json``'s ``optimizer`` as its ``params``; the config id
``encoder_lr_scale`` sets the fraction. Full fine-tuning at one learning rate can move a
pre-trained encoder away from what it learned before the freshly initialised decoder has
caught up; a smaller encoder learning rate (discriminative fine-tuning) keeps more of it, and
0 leaves the encoder's weights where they start (its BatchNorm statistics still follow the
data), like the frozen-encoder probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["encoder_parameter_groups"]


def encoder_parameter_groups(
    network: nn.Module, learning_rate: float, encoder_lr_scale: float = 1.0
) -> Iterable[nn.Parameter] | list[dict[str, Any]]:
    """The ``params`` of a ``torch.optim`` optimiser for ``network``.

    Args:
        network: a network whose encoder is its ``encoder`` attribute (``SegResNetDS``,
            ``FedCRLDNet``'s shared encoder).
        learning_rate: the optimiser's learning rate (the decoder's and every other part's).
        encoder_lr_scale: the encoder's learning rate as a fraction of ``learning_rate``, >= 0.

    Returns:
        With a scale of 1, the network's parameters as one group (the optimiser then runs exactly
        as with ``network.parameters()``); otherwise two groups, the parameters under
        ``encoder.`` at ``learning_rate * encoder_lr_scale`` and the rest at ``learning_rate``.

    Raises:
        ValueError: a negative scale, or a scale other than 1 for a network without ``encoder``.
    """
    if encoder_lr_scale < 0:
        raise ValueError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
    if encoder_lr_scale == 1:
        return network.parameters()
    if not isinstance(getattr(network, "encoder", None), nn.Module):
        raise ValueError(f"encoder_lr_scale {encoder_lr_scale}: {type(network).__name__} has no encoder")
    named = list(network.named_parameters())
    return [
        {
            "params": [p for name, p in named if name.startswith("encoder.")],
            "lr": learning_rate * encoder_lr_scale,
        },
        {"params": [p for name, p in named if not name.startswith("encoder.")]},
    ]
