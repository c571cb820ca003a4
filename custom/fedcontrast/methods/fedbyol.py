"""Federated BYOL: BYOL at each site, online and target networks averaged and sent both ways (SPEC §2, §6).

The site trainer is :class:`~fedcontrast.methods.byol.BYOLTrainer` with
``target_update`` ``"average"``; the server (:class:`~fedcontrast.methods.target_sync.TargetSync`)
averages the ``weights/`` (online network: encoder, projection head, predictor) and the
``target/`` entries (target network: encoder, projection head), each weighted by the
samples the sites saw, and sends both to every site every round. It is the
communication reference of FCLOpt's PTNU and DP. Configuration:
:data:`~fedcontrast.methods.byol.DEFAULTS`.
"""

from __future__ import annotations

from fedcontrast.methods.byol import BYOLTrainer
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.target_sync import TargetSync

register(
    MethodSpec(
        name="fedbyol",
        trainer=BYOLTrainer,
        strategy=TargetSync,
        federated=True,
        pretraining=True,
        description="Federated BYOL: online and target networks averaged and sent both ways every round",
    )
)
