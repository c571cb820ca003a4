"""Networks of the bundle beyond MONAI's: the FedCRLD per-site network.

``FedCRLDNet`` (FedCRLD, Qi et al., MICCAI 2022) is the bundle's ``SegResNetDS`` with a second
encoder and a cross-attention block at the bottleneck. It is selected with the config id
``network_class``::

    "network_class": "scripts.networks.FedCRLDNet"      (default: "SegResNetDS")

and takes the same arguments as ``SegResNetDS`` (plus ``attention_heads``), so every other id of
``train.json`` (``init_filters``, ``blocks_down``, ``resolution`` ...) applies to it unchanged.

Parts, by state-dict prefix:

- ``encoder.*``: the **shared** encoder, a ``SegResEncoder`` exactly as in ``SegResNetDS``
  (so an encoder pre-trained by the project's contrastive methods loads into it). In federated
  training it is the only part that leaves a site: the server averages it.
- ``private_encoder.*``: a second ``SegResEncoder`` of the same configuration, the site's own.
- ``crl.*``: :class:`CrossAttentionRelocalisation`, the contrastive re-localisation block.
- ``up_layers.*``: the decoder of ``SegResNetDS``; its skip connections come from the private
  encoder only.

``forward(x)`` returns what ``SegResNetDS`` returns (logits ``(B, out_channels, *spatial)``), so
the bundle's trainer, evaluator and inferers run it unchanged; :meth:`FedCRLDNet.forward_features`
also returns the bottleneck features the FedCRLD losses need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.segresnet_ds import SegResEncoder, SegResNetDS
from monai.utils import UpsampleMode
from torch import nn

__all__ = ["CrossAttentionRelocalisation", "FedCRLDNet"]


class CrossAttentionRelocalisation(nn.Module):
    """Contrastive re-localisation block: private features attend to the shared encoder's.

    Spatial positions of the bottleneck are tokens (no positional embedding, so any input size
    works, as sliding-window inference needs). With ``P`` the private and ``S`` the shared
    tokens, ``(B, L, C)``::

        P1 = LayerNorm(P + SelfAttention(P, P, P))
        Z  = LayerNorm(P1 + CrossAttention(query=P1, key=S, value=P1))
        out = Conv1x1(concat(P, Z))                                   (back to C channels)

    The shared features enter only through the attention weights (keys), so the site takes
    from the server's encoder only what correlates with its own representation; the values
    stay the site's own.

    Args:
        spatial_dims: 2 or 3.
        channels: C, channels of both bottleneck feature maps.
        heads: attention heads; must divide ``channels``.
    """

    def __init__(self, spatial_dims: int, channels: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention heads ({heads}) must divide the bottleneck channels ({channels})")
        self.self_attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_self = nn.LayerNorm(channels)
        self.cross_attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(channels)
        self.fuse = Conv[Conv.CONV, spatial_dims](2 * channels, channels, kernel_size=1, bias=True)

    def forward(self, private: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` private and shared bottleneck features -> ``(B, C, *S)`` re-localised features."""
        if private.shape != shared.shape:
            raise ValueError(
                f"private {tuple(private.shape)} and shared {tuple(shared.shape)} features differ"
            )
        batch, channels, *spatial = private.shape
        p = private.flatten(2).transpose(1, 2)  # (B, L, C)
        s = shared.flatten(2).transpose(1, 2)
        p1 = self.norm_self(p + self.self_attention(p, p, p, need_weights=False)[0])
        z = self.norm_cross(p1 + self.cross_attention(p1, s, p1, need_weights=False)[0])
        z = z.transpose(1, 2).reshape(batch, channels, *spatial)
        return self.fuse(torch.cat([private, z], dim=1))


class FedCRLDNet(SegResNetDS):
    """``SegResNetDS`` with a shared and a private encoder fused by cross-attention (module docstring).

    Args:
        attention_heads: heads of :class:`CrossAttentionRelocalisation`.
        others: as ``monai.networks.nets.SegResNetDS``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 32,
        in_channels: int = 1,
        out_channels: int = 2,
        act: tuple | str = "relu",
        norm: tuple | str = "batch",
        blocks_down: tuple = (1, 2, 2, 4),
        blocks_up: tuple | None = None,
        dsdepth: int = 1,
        preprocess: nn.Module | Callable | None = None,
        upsample_mode: UpsampleMode | str = "deconv",
        resolution: tuple | None = None,
        attention_heads: int = 4,
    ):
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            act=act,
            norm=norm,
            blocks_down=blocks_down,
            blocks_up=blocks_up,
            dsdepth=dsdepth,
            preprocess=preprocess,
            upsample_mode=upsample_mode,
            resolution=resolution,
        )
        # the same configuration as the shared encoder SegResNetDS built
        self.private_encoder = SegResEncoder(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            act=act,
            norm=norm,
            blocks_down=blocks_down,
            anisotropic_scales=self.anisotropic_scales,
        )
        self.bottleneck_channels = init_filters * 2 ** (len(blocks_down) - 1)
        self.crl = CrossAttentionRelocalisation(spatial_dims, self.bottleneck_channels, attention_heads)

    @property
    def shared_encoder(self) -> nn.Module:
        """The encoder the server averages (state-dict prefix ``encoder.``)."""
        return self.encoder

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits and bottleneck features of ``x`` ``(B, in_channels, *spatial)``.

        Returns:
            ``logits``: as :meth:`forward` (a list of deep-supervision outputs in training mode
            when ``dsdepth > 1``); ``shared``, ``private``: the two encoders' deepest feature maps
            ``(B, C, *s)``; ``fused``: the re-localised bottleneck ``(B, C, *s)`` the decoder starts from.
        """
        if self.preprocess is not None:
            x = self.preprocess(x)
        if not self.is_valid_shape(x):
            raise ValueError(f"Input spatial dims {x.shape} must be divisible by {self.shape_factor()}")
        shared = self.encoder(x)[-1]
        skips = self.private_encoder(x)
        private = skips[-1]
        fused = self.crl(private, shared)
        skips = skips[:-1][::-1]  # deepest first, as the decoder consumes them
        outputs: list[torch.Tensor] = []
        h = fused
        for i, level in enumerate(self.up_layers):
            h = level["upsample"](h)
            if skips:
                h = h + skips[i]
            h = level["blocks"](h)
            if len(self.up_layers) - i <= self.dsdepth:
                outputs.append(level["head"](h))
        outputs.reverse()
        logits = outputs[0] if not self.training or len(outputs) == 1 else outputs
        return {"logits": logits, "shared": shared, "private": private, "fused": fused}

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits, as ``SegResNetDS.forward``."""
        return self.forward_features(x)["logits"]
