"""The optimiser's parameter groups: the encoder can fine-tune at a fraction of the learning rate,
and can wait while the decoder trains first.

Referenced from ``train.json``: :func:`encoder_parameter_groups` is its ``optimizer``'s
``params`` (config ids ``encoder_lr_scale`` and ``encoder_warmup_iterations``) and
:class:`EncoderWarmup` one of its train handlers. Full fine-tuning at one learning rate can move a
pre-trained encoder away from what it learned before the freshly initialised decoder has
caught up. Two standard remedies keep more of it: a smaller encoder learning rate
(discriminative fine-tuning; 0 leaves the encoder's weights where they start, its BatchNorm
statistics still following the data, like the frozen-encoder probe), and training the decoder
alone for the first iterations before the encoder joins (linear probing, then fine-tuning).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ignite.engine import Engine, Events
from torch import nn
from torch.optim import Optimizer

__all__ = ["ENCODER_LR", "EncoderWarmup", "encoder_parameter_groups"]

#: key of the encoder's parameter group that holds its learning rate after the warm-up
ENCODER_LR = "encoder_lr"


def encoder_parameter_groups(
    network: nn.Module,
    learning_rate: float,
    encoder_lr_scale: float = 1.0,
    encoder_warmup_iterations: int = 0,
) -> Iterable[nn.Parameter] | list[dict[str, Any]]:
    """The ``params`` of a ``torch.optim`` optimiser for ``network``.

    Args:
        network: a network whose encoder is its ``encoder`` attribute (``SegResNetDS``,
            ``FedCRLDNet``'s shared encoder).
        learning_rate: the optimiser's learning rate (the decoder's and every other part's).
        encoder_lr_scale: the encoder's learning rate as a fraction of ``learning_rate``, >= 0.
        encoder_warmup_iterations: iterations for which :class:`EncoderWarmup` holds the
            encoder's learning rate at 0, >= 0 (the groups only mark the encoder's group for it).

    Returns:
        With a scale of 1 and no warm-up, the network's parameters as one group (the optimiser
        then runs exactly as with ``network.parameters()``); otherwise two groups, the
        parameters under ``encoder.`` at ``learning_rate * encoder_lr_scale`` (also kept under
        :data:`ENCODER_LR`) and the rest at ``learning_rate``.

    Raises:
        ValueError: a negative scale or warm-up, or either set for a network without ``encoder``.
    """
    if encoder_lr_scale < 0:
        raise ValueError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
    if encoder_warmup_iterations < 0:
        raise ValueError(f"encoder_warmup_iterations must be >= 0, got {encoder_warmup_iterations}")
    if encoder_lr_scale == 1 and encoder_warmup_iterations == 0:
        return network.parameters()
    if not isinstance(getattr(network, "encoder", None), nn.Module):
        raise ValueError(
            f"encoder_lr_scale {encoder_lr_scale}, encoder_warmup_iterations {encoder_warmup_iterations}: "
            f"{type(network).__name__} has no encoder"
        )
    named = list(network.named_parameters())
    encoder_lr = learning_rate * encoder_lr_scale
    return [
        {
            "params": [p for name, p in named if name.startswith("encoder.")],
            "lr": encoder_lr,
            ENCODER_LR: encoder_lr,
        },
        {"params": [p for name, p in named if not name.startswith("encoder.")]},
    ]


class EncoderWarmup:
    """Train handler: the encoder's learning rate is 0 for the first ``iterations`` iterations.

    The count is the trainer's own iteration counter, which goes on across federated rounds and
    is restored with the trainer, so the warm-up spans a site's first ``iterations`` optimiser
    steps however they are split into rounds. The encoder's weights stay where they start
    meanwhile (AdamW's weight decay scales with the learning rate; BatchNorm statistics still
    follow the data); afterwards it trains at its group's :data:`ENCODER_LR`.

    Args:
        optimizer: an optimiser built on :func:`encoder_parameter_groups`.
        iterations: warm-up iterations, >= 0 (0: the handler does nothing).

    Raises:
        ValueError: ``iterations`` > 0 and no parameter group marked as the encoder's.
    """

    def __init__(self, optimizer: Optimizer, iterations: int = 0):
        self.iterations = int(iterations)
        self.groups = [g for g in optimizer.param_groups if ENCODER_LR in g]
        if self.iterations > 0 and not self.groups:
            raise ValueError(
                "encoder warm-up: the optimiser has no encoder parameter group (encoder_parameter_groups)"
            )

    def attach(self, engine: Engine) -> None:
        """Hold the encoder at the start of every iteration of ``engine`` (nothing with no warm-up)."""
        if self.iterations > 0:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Set the encoder's learning rate for the iteration about to run (1-based count)."""
        warming = engine.state.iteration <= self.iterations
        for group in self.groups:
            group["lr"] = 0.0 if warming else group[ENCODER_LR]
