"""The paper's mask network (after Mask Frozen-DETR).

```
 cached levels (b4, e8, e16, e32 ...)                      cached decoder queries [B,K,D]
   │ ImageEncoder: 1x1 channel mapper per level -> dim        │ QueryEncoder: LN + MLP -> dim,
   │   cross-level attention over coarse tokens,              │   object-to-object attention
   │   FPN top-down fusion -> fused map (stride 8) + blocks   │   among the image's valid boxes
   ▼                                                          ▼
 fused multi-level RoIAlign (fused map + finer mapped levels, summed) -> [R, dim, 32, 32]
   │ FiLM(query)      (query fusion: per-channel scale/shift)
   │ BoxEncoder       (2 residual depthwise-separable conv blocks, or + pooled box attention)
   ▼
 mask logits [R, 32, 32] = box features . mask_embed(query)     iou_pred [R] = MaskIoUHead(features,
   │                                                                       mask, query)
   │ PixelRefiner (with a pxN level in the cache): on a 64x64 grid, coarse logit + MLP(box features,
   ▼   3x3 RGB pixel patch) -> mask logits [R, 64, 64]
```

``MaskNet.forward(batch, select=None) -> {"mask_logits": [R,M,M], "iou_pred": [R], "rows": [R,2]}``
for the selected boxes (default ``batch["valid"]``), in row-major (b, k) order, logits in the box frame
(row 0 = the box's top edge, column 0 its left edge). Boxes arrive in original pixels and are mapped to
the network-input frame with the batch's ``scale`` before RoIAlign (``spatial_scale = 1/stride``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mfdetr.detectors.base import LevelSpec
from mfdetr.model.box_encoder import BoxEncoder
from mfdetr.model.config import MaskNetConfig
from mfdetr.model.head_base import MaskNetBase, run_in_chunks
from mfdetr.model.image_encoder import Pointwise
from mfdetr.model.iou_head import MaskIoUHead
from mfdetr.model.query_encoder import DotMaskPredictor, QueryEncoder, QueryShapePrior


class MaskNet(MaskNetBase):
    """The paper's mask network (see the module docstring)."""

    def __init__(self, cfg: MaskNetConfig, levels: Sequence[LevelSpec], query_dim: int):
        super().__init__()
        d = cfg.dim
        bd = cfg.box_dim or d
        self._init_base(cfg, levels, query_dim, fine_dim=bd)
        # RoIAlign is linear: projecting the (few) image-level maps to box_dim before pooling equals
        # projecting every box after pooling, at a fraction of the cost
        self.box_proj = Pointwise(d, bd, bias=False) if bd != d and d in self.image_encoder.dims else None
        self.query_encoder = QueryEncoder(query_dim, d, cfg.object_attn_layers, cfg.query_fusion, box_dim=bd)
        self.box_encoder = BoxEncoder(
            bd,
            cfg.box_encoder,
            cfg.box_encoder_layers,
            cfg.box_encoder_scale,
            query_dim=d,
            objects=cfg.box_object_attn,
        )
        if cfg.mask_predictor == "dot":
            self.predictor: nn.Module = DotMaskPredictor(bd, d)
        else:
            self.predictor = Pointwise(bd, 1)
        self.prior = QueryShapePrior(d, cfg.query_prior) if cfg.query_prior > 0 else None
        self.iou_head = MaskIoUHead(bd, d) if cfg.iou_head else None
        self._init_refiner(bd, cfg.roi_size * cfg.mask_upsample)

    def forward(self, batch: dict[str, Any], select: Tensor | None = None) -> dict[str, Tensor]:
        maps, strides, rows, rois = self.features_and_rois(batch, select)
        q_all = self.query_encoder.encode(batch["queries"].to(maps[0].dtype), batch["valid"])
        if self.box_proj is not None:
            d_in = self.box_proj.weight.shape[1]
            maps = [self.box_proj(m) if m.shape[1] == d_in else m for m in maps]

        def boxes(idx: slice) -> tuple[Tensor, Tensor | None]:
            r = rows[idx]
            q = q_all[r[:, 0], r[:, 1]]
            x = self.pool(maps, strides, rois[idx], self.cfg.roi_size)
            x = self.query_encoder.fuse(x, q)
            objects = self._objects(batch, r, q_all) if self.box_encoder.objects else None
            x = self.box_encoder(x, q, objects)
            logits = (
                self.predictor(x, q) if self.cfg.mask_predictor == "dot" else self.predictor(x).squeeze(1)
            )
            if self.prior is not None:
                logits = logits + self.prior(q, logits.shape[-1]).to(logits.dtype)
            iou = self.iou_head(x, logits, q) if self.iou_head is not None else None
            return self.refine(batch, logits, x, rois[idx], refined), iou

        refined: list[tuple[Tensor, Tensor]] = []
        logits, iou_logit = run_in_chunks(boxes, rows.shape[0], self.training)
        return self.output(logits, iou_logit, rows, refined)

    @staticmethod
    def _objects(batch: dict[str, Any], rows: Tensor, q_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every valid object of each selected box's image: (queries [R,K,d], boxes relative to the
        selected box [R,K,4], ignore [R,K]) for the box-to-object attention."""
        b = rows[:, 0]
        boxes = batch["boxes"].float()
        own = boxes[b, rows[:, 1]]
        return q_all[b], relative_boxes(own, boxes[b]).to(q_all.dtype), ~batch["valid"][b]


def relative_boxes(own: Tensor, others: Tensor) -> Tensor:
    """Boxes ``others`` [R,K,4] in the unit frame of ``own`` [R,4] (0..1 inside it), clamped to [-4, 5]."""
    x1, y1, x2, y2 = own.unbind(-1)
    w = (x2 - x1).clamp(min=1e-3)[:, None]
    h = (y2 - y1).clamp(min=1e-3)[:, None]
    rel = torch.stack(
        [
            (others[..., 0] - x1[:, None]) / w,
            (others[..., 1] - y1[:, None]) / h,
            (others[..., 2] - x1[:, None]) / w,
            (others[..., 3] - y1[:, None]) / h,
        ],
        dim=-1,
    )
    return rel.clamp(-4.0, 5.0)
