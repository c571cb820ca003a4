"""FedSimCLR: SimCLR (the G^R global contrastive loss) at each site, FedAvg of encoder and head.

The site trainer is :class:`~fedcontrast.methods.local_cl.GlobalContrastiveTrainer`
with ``loss_strategy`` ``"G^R"``; the server averages the ``weights/`` entries
(``encoder.*`` and ``head.*``) weighted by the samples each site saw (the default
:class:`~fedcontrast.methods.base.ServerStrategy`). Configuration: :data:`DEFAULTS`.
"""

from __future__ import annotations

from typing import Any

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.local_cl import DEFAULTS as LOCAL_CL_DEFAULTS
from fedcontrast.methods.local_cl import GlobalContrastiveTrainer
from fedcontrast.methods.registry import MethodSpec, register

DEFAULTS: dict[str, Any] = {**LOCAL_CL_DEFAULTS, "loss_strategy": "G^R"}


class FedSimCLRTrainer(GlobalContrastiveTrainer):
    """SimCLR at one site (G^R by default)."""

    DEFAULTS = DEFAULTS


register(
    MethodSpec(
        name="fedsimclr",
        trainer=FedSimCLRTrainer,
        strategy=ServerStrategy,
        federated=True,
        pretraining=True,
        description="FedSimCLR: SimCLR at each site, FedAvg of encoder and projection head",
    )
)
