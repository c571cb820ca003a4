"""``fedprox``: supervised federated training with FedProx's proximal term (Li et al., MLSys 2020).

The ``supervised`` method (the bundle's own train workflow, FedAvg on the server) with the
bundle's Dice+CE loss extended by ``(mu / 2) * ||w - w_global||^2``, ``w_global`` the network
the site received this round. The proximal term is NVFlare's ``PTFedProxLoss``
(``nvflare.app_opt.pt``): a plain ``torch.nn`` loss module, the one piece of NVFlare the learning
code uses, so that the project's FedProx is the one NVFlare ships.

Configuration: ``supervised``'s (see :mod:`fedcontrast.methods.supervised`) plus ``mu``
(default :data:`DEFAULT_MU`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from nvflare.app_opt.pt import PTFedProxLoss
from torch import nn

from fedcontrast.methods.base import Message, SiteUpdate, message_to_state_dict
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.supervised import DEFAULTS as SUPERVISED_DEFAULTS
from fedcontrast.methods.supervised import SupervisedBundleTrainer
from fedcontrast.nets.encoder import momentum_copy

DEFAULT_MU = 0.01


class ProximalLoss(nn.Module):
    """``loss(pred, target) + PTFedProxLoss(mu)(network, reference)``.

    Args:
        loss: the segmentation loss (the bundle's Dice+CE).
        network: the network being trained (its parameters get the proximal gradient).
        reference: a frozen network of the same architecture holding the round's global weights.
        mu: proximal weight (>= 0).
    """

    def __init__(self, loss: nn.Module, network: nn.Module, reference: nn.Module, mu: float):
        super().__init__()
        self.loss = loss
        self.proximal = PTFedProxLoss(mu=mu)
        # not registered as submodules: they belong to the trainer
        self._pair = (network, reference)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of one batch."""
        network, reference = self._pair
        return self.loss(pred, target) + self.proximal(network, reference)


class FedProxTrainer(SupervisedBundleTrainer):
    """``supervised`` with the proximal term toward the round's received global network."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**SUPERVISED_DEFAULTS, "mu": DEFAULT_MU}

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        mu = float(self.config["mu"])
        self.reference = momentum_copy(self.network)
        self.trainer.loss_function = ProximalLoss(
            self.trainer.loss_function, self.network, self.reference, mu
        )

    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """As ``supervised``, with the received weights as the proximal reference of this round."""
        state = message_to_state_dict(incoming, "weights")
        self.reference.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        return super().local_round(incoming, round_num)


SPEC = register(
    MethodSpec(
        name="fedprox",
        trainer=FedProxTrainer,
        pretraining=False,
        description="supervised FedAvg with FedProx's proximal term (NVFlare's PTFedProxLoss)",
    )
)
