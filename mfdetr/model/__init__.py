"""The mask network: one part per file, the factory here.

image_encoder (channel mappers, cross-level attention, fusion), box_encoder, query_encoder (query
fusion, object attention, dot-product masks), iou_head (mask scoring), head_base (what every head
shares), mask_net (the paper's head), fcn_head (the Mask R-CNN-style baseline), losses, checkpoint
(the one checkpoint format).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.model.config import LossConfig, MaskNetConfig
from mfdetr.model.fcn_head import FCNMaskNet
from mfdetr.model.head_base import MaskNetBase
from mfdetr.model.mask_net import MaskNet

__all__ = [
    "LossConfig",
    "MaskNetConfig",
    "MaskNetBase",
    "MaskNet",
    "FCNMaskNet",
    "build_mask_net",
    "count_parameters",
]


def build_mask_net(cfg: MaskNetConfig, levels: Sequence[LevelSpec], query_dim: int) -> MaskNetBase:
    """The mask network ``cfg.head`` asks for, built for a cache's ``levels`` and ``query_dim``."""
    if cfg.head == "fcn":
        return FCNMaskNet(cfg, levels, query_dim)
    if cfg.head == "mfdetr":
        return MaskNet(cfg, levels, query_dim)
    raise MfdetrError(f"unknown mask head {cfg.head!r}; choose 'mfdetr' or 'fcn'")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
