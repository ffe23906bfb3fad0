"""Mask R-CNN-style FCN mask head: the baseline users would otherwise pick, under the same interface.

Same image encoder (channel mapper + fusion) and fused RoIAlign as the paper's network, then per box:
RoIAlign ``fcn_roi_size`` (14) -> ``fcn_convs`` x (3x3 conv + ReLU) -> 2x deconv + ReLU -> 1x1 conv
-> class-agnostic mask logits ``[R, 2*fcn_roi_size, 2*fcn_roi_size]`` (28x28). No queries. The mask-IoU
head (Mask Scoring R-CNN) scores the masks from the head's features when ``iou_head`` is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.base import LevelSpec
from mfdetr.model.config import MaskNetConfig
from mfdetr.model.head_base import MaskNetBase, run_in_chunks
from mfdetr.model.iou_head import MaskIoUHead


class FCNMaskNet(MaskNetBase):
    """``forward(batch, select=None) -> {"mask_logits": [R,M,M], "iou_pred": [R], "rows": [R,2]}``."""

    def __init__(self, cfg: MaskNetConfig, levels: Sequence[LevelSpec], query_dim: int):
        super().__init__()
        self._init_base(cfg, levels, query_dim)
        width = cfg.fcn_dim or cfg.dim
        layers: list[nn.Module] = []
        c = cfg.dim
        for _ in range(cfg.fcn_convs):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
            c = width
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(c, width, 2, stride=2)
        self.logits = nn.Conv2d(width, 1, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m is not self.logits:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.logits.weight, std=0.001)
        nn.init.zeros_(self.logits.bias)
        self.iou_head = MaskIoUHead(width, 0) if cfg.iou_head else None
        self._init_refiner(width, 2 * cfg.fcn_roi_size * cfg.mask_upsample)

    def forward(self, batch: dict[str, Any], select: Tensor | None = None) -> dict[str, Tensor]:
        maps, strides, rows, rois = self.features_and_rois(batch, select)

        def boxes(idx: slice):
            x = self.pool(maps, strides, rois[idx], self.cfg.fcn_roi_size)
            x = F.relu(self.deconv(self.convs(x)))
            logits = self.logits(x).squeeze(1)
            iou = self.iou_head(x, logits) if self.iou_head is not None else None
            return self.refine(batch, logits, x, rois[idx], refined), iou

        refined: list[tuple[Tensor, Tensor]] = []
        logits, iou_logit = run_in_chunks(boxes, rows.shape[0], self.training)
        return self.output(logits, iou_logit, rows, refined)
