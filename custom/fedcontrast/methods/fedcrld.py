"""``fedcrld``: supervised federated segmentation across heterogeneous sites (FedCRLD, SPEC §5).

Qi et al., MICCAI 2022, built from the paper's description and SPEC §5 (the authors'
released code never loads the server's average back into the clients; here it does).

**Network** (the bundle's ``scripts.networks.FedCRLDNet``, selected by the bundle config id
``network_class``; see :func:`network_overrides`): a shared encoder (``encoder.*``), a
private encoder (``private_encoder.*``), a cross-attention re-localisation block at the
bottleneck (``crl.*``: query from the private features, key from the shared ones, value from
the private ones) and the decoder (``up_layers.*``, skips from the private encoder).

**Round** at a site:

1. load the received shared encoder into the site's network (the private encoder, the CRL
   block and the decoder are the site's own and stay in the trainer between rounds);
2. train ``local_epochs`` epochs on the labelled volumes through the bundle's transforms and
   data loader, minimising::

       Dice+CE(logits, labels)                                     (the bundle's loss)
       + mi_weight      * MI(shared, private)                      (contrastive re-localisation)
       + distill_weight * CE(logits / T, softmax(history logits / T))   (momentum distillation)
       + feature_weight * MSE(fused bottleneck, history's fused bottleneck)

   ``MI`` compares the two encoders' bottleneck features of each image, global-average-pooled:
   ``mi_form="infonce"`` (default) is :func:`~fedcontrast.methods.losses.cross_encoder_info_nce`
   on the L2-normalised pooled features (same image pulled together, other images of the batch
   pushed apart, the project's one InfoNCE); ``"symmetric_kl"`` is the authors' code's symmetric
   KL between softmax-normalised pooled features;
3. update the **history model** (the momentum bank): an EMA of the site's models after each
   round, ``history <- m * history + (1 - m) * model`` with ``m = history_momentum``
   (:func:`~fedcontrast.nets.encoder.ema_update`). Project choices, configurable: it is updated
   once per round (the "past models" are the rounds' models), the first update copies the
   model (an average with the untrained network would be noise), and the distillation terms
   start in the round after the first update (round 1); the history model runs in eval mode;
4. validate on the held-out entries (the bundle's evaluator), save the site's full network as
   ``<workdir>/<site>/site_model.pt`` (:data:`SITE_MODEL_FILE`; a plain state dict that the
   bundle's evaluation and inference load with ``network_class`` set), and upload **only the
   shared encoder** (``weights/encoder.*``).

**Server** (:class:`FedCRLDStrategy`): averages the shared encoder only, weighted by samples
(``aggregation="samples"``, the project's default) or unweighted (``"uniform"``, as in the
authors' code), and refuses an upload that holds anything else, naming the site.

Configuration (:data:`DEFAULTS`): ``bundle_dir``, ``bundle`` (bundle config overrides),
``pretrained_encoder`` (loaded into the shared encoder), ``local_epochs``, ``lr``,
``batch_size``, ``seed``, ``device``, ``num_workers``, ``workdir`` as for ``supervised``;
``mi_form``, ``mi_weight``, ``temperature`` (τ of the InfoNCE form), ``history_momentum``,
``distill_weight``, ``feature_weight``, ``distill_temperature``, ``aggregation``. Defaults follow
the authors' code where it has one (history momentum 0.5, distillation weight 0.2, feature
MSE weight 1); ``mi_weight`` 0.1 is the project's choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedcontrast.methods.base import (
    Message,
    ServerStrategy,
    SiteTrainer,
    SiteUpdate,
    check_choice,
    kind_of,
    merge_config,
    message_to_state_dict,
    pack,
    site_folder,
    weighted_average,
)
from fedcontrast.methods.losses import MI_FORMS, cross_encoder_info_nce, symmetric_kl
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.supervised import labelled_workflow
from fedcontrast.nets.bundle import (
    build_network,
    encoder_options,
    load_pretrained_encoder,
    state_mismatch,
)
from fedcontrast.nets.encoder import ema_update, momentum_copy

#: Bundle config value of ``network_class`` that selects the FedCRLD network.
FEDCRLD_NETWORK = "scripts.networks.FedCRLDNet"
#: The site's full network, written in ``<workdir>/<site>/`` after every round.
SITE_MODEL_FILE = "site_model.pt"
#: State-dict prefix of the shared encoder: the only part that leaves a site.
SHARED_PREFIX = "encoder."
AGGREGATIONS: tuple[str, ...] = ("samples", "uniform")

DEFAULTS: dict[str, Any] = {
    "bundle_dir": None,
    "bundle": {},
    "pretrained_encoder": "",
    "local_epochs": 1,
    "lr": 1e-3,
    "batch_size": 2,
    "seed": 0,
    "device": None,
    "num_workers": 0,
    "workdir": None,
    "mi_form": "infonce",
    "mi_weight": 0.1,
    "temperature": 0.1,
    "history_momentum": 0.5,
    "distill_weight": 0.2,
    "feature_weight": 1.0,
    "distill_temperature": 1.0,
    "aggregation": "samples",
}


def network_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """Bundle config overrides building the FedCRLD network: ``network_class`` + ``config["bundle"]``."""
    return {"network_class": FEDCRLD_NETWORK, **dict(config.get("bundle") or {})}


def shared_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The shared encoder's entries of ``network.state_dict()`` (keys with ``encoder.``)."""
    return {f"{SHARED_PREFIX}{k}": v for k, v in network.encoder.state_dict().items()}


def mutual_information(
    shared: torch.Tensor, private: torch.Tensor, form: str, temperature: float
) -> torch.Tensor:
    """The MI term between two ``(B, C, *S)`` bottleneck maps, pooled over space (module docstring)."""
    shared = shared.flatten(2).mean(dim=2)
    private = private.flatten(2).mean(dim=2)
    if form == "infonce":
        return cross_encoder_info_nce(F.normalize(shared, dim=1), F.normalize(private, dim=1), temperature)
    if form == "symmetric_kl":
        return symmetric_kl(shared, private)
    raise ValueError(f"unknown mi_form {form!r}; expected one of {MI_FORMS}")


def soft_cross_entropy(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``-sum_c softmax(teacher / T)_c * log_softmax(logits / T)_c``, averaged over batch and voxels.

    Args:
        logits, teacher_logits: ``(B, classes, *spatial)``.
        temperature: T > 0.
    """
    target = torch.softmax(teacher_logits / temperature, dim=1)
    return -(target * torch.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


class FedCRLDTrainer(SiteTrainer):
    """Site trainer of FedCRLD (module docstring).

    Args:
        config: merged over :data:`DEFAULTS`.
        datalist: labelled entries; those with ``"split": "validation"`` are validation only.
        site: the site's name.
        device: torch device when ``config["device"]`` is None.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        cfg = self.config
        check_choice(cfg, "mi_form", MI_FORMS)
        check_choice(cfg, "aggregation", AGGREGATIONS)
        if not 0.0 <= float(cfg["history_momentum"]) <= 1.0:
            raise ValueError(f"history_momentum must be in [0, 1], got {cfg['history_momentum']}")
        self.site_dir, self._tmp = site_folder(cfg["workdir"], site)
        self.site_dir.mkdir(parents=True, exist_ok=True)
        self.workflow, train, val = labelled_workflow(
            cfg, datalist, site, self.device, self.site_dir, network_overrides(cfg), int(cfg["local_epochs"])
        )
        self.num_train = len(train)
        parser = self.workflow.parser
        self.network: nn.Module = parser.get_parsed_content("network")
        if not hasattr(self.network, "forward_features"):
            raise ValueError(
                f"site {site}: the bundle network {type(self.network).__name__} is not FedCRLDNet"
            )
        self.optimizer: torch.optim.Optimizer = parser.get_parsed_content("optimizer")
        self.segmentation_loss: nn.Module = parser.get_parsed_content("loss")
        self.loader = parser.get_parsed_content("train#dataloader")
        self.evaluator = parser.get_parsed_content("validate#evaluator") if val else None
        self.history: nn.Module = momentum_copy(self.network).eval()
        self.history_updates = 0
        self.model_path = self.site_dir / SITE_MODEL_FILE

    @classmethod
    def initial_message(cls, config: Mapping[str, Any]) -> Message:
        """The shared encoder of the seeded FedCRLD network (global RNG untouched), with the
        optional ``pretrained_encoder`` loaded, as ``weights/encoder.*`` entries."""
        cfg = merge_config(cls.DEFAULTS, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            network = build_network(cfg["bundle_dir"], network_overrides(cfg))
        if cfg["pretrained_encoder"]:
            options = encoder_options(cfg["bundle_dir"], network_overrides(cfg))
            load_pretrained_encoder(network, cfg["pretrained_encoder"], options, cfg["bundle_dir"])
        return pack("weights", shared_state(network))

    def load_shared(self, incoming: Message) -> None:
        """Put the received shared encoder into the site's network; anything else is refused."""
        state = message_to_state_dict(incoming, "weights")
        problem = state_mismatch(shared_state(self.network), state)
        if problem:
            raise ValueError(f"site {self.site}: expected the shared encoder's entries: {problem}")
        prefix = len(SHARED_PREFIX)
        self.network.encoder.load_state_dict({k[prefix:]: v.to(self.device) for k, v in state.items()})

    def training_step(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """The FedCRLD loss of one batch ``(B, 1, *spatial)`` and its terms; no optimiser step."""
        cfg = self.config
        out = self.network.forward_features(image)
        logits = out["logits"]
        if isinstance(logits, list):
            raise ValueError("FedCRLD needs the network's single output (dsdepth=1)")
        terms = {
            "loss_seg": self.segmentation_loss(logits, label),
            "loss_mi": mutual_information(
                out["shared"], out["private"], cfg["mi_form"], float(cfg["temperature"])
            ),
        }
        total = terms["loss_seg"] + float(cfg["mi_weight"]) * terms["loss_mi"]
        if self.history_updates:
            with torch.no_grad():
                past = self.history.forward_features(image)
            terms["loss_distill"] = soft_cross_entropy(
                logits, past["logits"], float(cfg["distill_temperature"])
            )
            terms["loss_feature"] = F.mse_loss(out["fused"], past["fused"])
            total = (
                total
                + float(cfg["distill_weight"]) * terms["loss_distill"]
                + float(cfg["feature_weight"]) * terms["loss_feature"]
            )
        terms["train_loss"] = total
        return terms

    @torch.no_grad()
    def update_history(self) -> None:
        """EMA of the site's model into the history model; the first update copies it (module docstring)."""
        if self.history_updates == 0:
            self.history.load_state_dict(self.network.state_dict())
        else:
            ema_update(self.history, self.network, float(self.config["history_momentum"]))
        self.history_updates += 1

    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """Shared encoder in, ``local_epochs`` epochs, history update, validation, site model saved,
        shared encoder out.

        Metrics: ``train_loss`` and its terms ``loss_seg``, ``loss_mi`` (and from round 1
        ``loss_distill``, ``loss_feature``), means over the round's steps; ``steps``; with
        validation entries the bundle evaluator's ``val_dice`` and ``val_dice_<class>``.
        """
        self.load_shared(incoming)
        self.network.train()
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(int(self.config["local_epochs"])):
            for batch in self.loader:
                image = batch["image"].to(self.device)
                label = batch["label"].to(self.device)
                terms = self.training_step(image, label)
                self.optimizer.zero_grad(set_to_none=True)
                terms["train_loss"].backward()
                self.optimizer.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                steps += 1
        self.update_history()
        metrics = {name: total / max(steps, 1) for name, total in sums.items()}
        metrics["steps"] = float(steps)
        if self.evaluator is not None:
            self.evaluator.run(global_epoch=round_num + 1)
            metrics.update({k: float(v) for k, v in self.evaluator.state.metrics.items()})
        self.save_site_model()
        return SiteUpdate(
            message=pack("weights", shared_state(self.network)),
            num_samples=self.num_train * int(self.config["local_epochs"]),
            metrics=metrics,
        )

    def save_site_model(self) -> Path:
        """Write the site's full network (a plain state dict) to :attr:`model_path`, atomically."""
        state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        tmp = self.model_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.model_path)
        return self.model_path

    def site_state_dict(self) -> dict[str, torch.Tensor]:
        """The site's full network (shared and private parts), CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The shared encoder's state dict (keys without ``encoder.``), CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.network.encoder.state_dict().items()}


class FedCRLDStrategy(ServerStrategy):
    """Averages the shared encoder only; an upload with any other entry is refused."""

    def aggregate(self, updates: Mapping[str, SiteUpdate], round_num: int) -> None:
        """Average the sites' ``weights/encoder.*`` (``aggregation``: by samples or uniform)."""
        for site, update in updates.items():
            foreign = sorted(
                k
                for k in update.message
                if kind_of(k) != "weights" or not k.startswith(f"weights/{SHARED_PREFIX}")
            )
            if foreign:
                raise ValueError(
                    f"round {round_num}: {site} uploaded entries other than the shared encoder: {foreign[:5]}"
                )
        uniform = self.config.get("aggregation", DEFAULTS["aggregation"]) == "uniform"
        weights = dict.fromkeys(updates, 1.0) if uniform else None
        self.global_message.update(weighted_average(updates, kind="weights", weights=weights))


SPEC = register(
    MethodSpec(
        name="fedcrld",
        trainer=FedCRLDTrainer,
        strategy=FedCRLDStrategy,
        pretraining=False,
        description="FedCRLD: shared encoder averaged, private encoder + decoder per site, "
        "cross-attention re-localisation and momentum distillation",
    )
)
