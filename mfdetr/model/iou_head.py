"""Mask scoring (Mask Scoring R-CNN): the predicted IoU of each box's mask, shared by every head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.model.image_encoder import Pointwise
from mfdetr.model.query_encoder import MLP


class MaskIoUHead(nn.Module):
    """Mask scoring: predicted IoU of a box's mask from its features, its mask and (optionally) query.

    ``[R, C, S, S]`` features + ``[R, S', S']`` mask logits (detached: scoring must not bend the
    masks) -> 2x2 average (at S >= 32) -> 1x1 reduce -> two stride-2 3x3 convs -> global average ->
    MLP (+ query) -> a logit (``iou_pred = sigmoid(logit)``; the loss sees the logit, so a saturated
    sigmoid never stops learning).
    """

    def __init__(self, in_dim: int, query_dim: int = 0, width: int = 64):
        super().__init__()
        self.reduce = Pointwise(in_dim + 1, width)
        self.conv1 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mlp = MLP(width + query_dim, width * 2, 1)
        self.query_dim = query_dim

    def forward(self, x: Tensor, mask_logits: Tensor, q: Tensor | None = None) -> Tensor:
        m = mask_logits.detach().unsqueeze(1)
        if m.shape[-2:] != x.shape[-2:]:
            m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
        m = torch.sigmoid(m).to(x.dtype)
        if x.shape[-1] >= 32:  # pool first: the concat then copies a quarter of the data
            x, m = F.avg_pool2d(x, 2), F.avg_pool2d(m, 2)
        h = F.gelu(self.reduce(torch.cat([x, m.contiguous(memory_format=torch.channels_last)], dim=1)))
        h = F.gelu(self.conv2(F.gelu(self.conv1(h))))
        h = h.mean(dim=(2, 3))
        if self.query_dim:
            h = torch.cat([h, q.to(h.dtype)], dim=1)
        return self.mlp(h).squeeze(1).float()  # a logit: iou_pred = sigmoid(logit)
