"""The mask network (after Mask Frozen-DETR) and ``build_mask_net``.

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
                                                                           mask, query)
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
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.model.box_encoder import BoxEncoder
from mfdetr.model.config import MaskNetConfig
from mfdetr.model.image_encoder import ImageEncoder, Pointwise
from mfdetr.model.query_encoder import MLP, DotMaskPredictor, QueryEncoder
from mfdetr.ops.roi_align import multilevel_roi_align


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


class MaskNetBase(nn.Module):
    """What every head shares: level bookkeeping, input checks, box selection and RoIs."""

    cfg: MaskNetConfig
    levels: list[LevelSpec]
    query_dim: int
    mask_size: int

    def _init_base(self, cfg: MaskNetConfig, levels: Sequence[LevelSpec], query_dim: int, fine_dim: int | None = None) -> None:
        self.cfg = cfg
        self.all_levels = list(levels)
        self.query_dim = int(query_dim)
        by_name = {lv.name: lv for lv in levels}
        names = list(cfg.levels) if cfg.levels else [lv.name for lv in levels]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise MfdetrError(
                f"mask network config asks for level(s) {missing} but the cache has levels "
                f"{[lv.name for lv in levels]}; fix model.levels"
            )
        self.levels = [by_name[n] for n in names]
        self.image_encoder = ImageEncoder(
            self.levels,
            cfg.dim,
            mode=cfg.image_encoder,
            depth=cfg.image_encoder_depth,
            fuse_stride=cfg.fuse_stride,
            coarse_attn_layers=cfg.coarse_attn_layers,
            coarse_attn_max_tokens=cfg.coarse_attn_max_tokens,
            fine_dim=fine_dim,
        )

    def check_batch(self, batch: dict[str, Any]) -> None:
        """A clear error when the batch's levels, channels or query width do not fit this network."""
        feats = batch["features"]
        for lv in self.levels:
            if lv.name not in feats:
                raise MfdetrError(
                    f"the batch has no feature level {lv.name!r} (it has {sorted(feats)}); the mask "
                    f"network was built for levels {[x.name for x in self.levels]}"
                )
            c = int(feats[lv.name].shape[1])
            if c != lv.channels:
                raise MfdetrError(
                    f"feature level {lv.name!r} has {c} channels in the batch but the mask network "
                    f"was built for {lv.channels}"
                )
        d = int(batch["queries"].shape[-1])
        if d != self.query_dim:
            raise MfdetrError(f"the batch's queries have width {d} but the mask network was built for {self.query_dim}")

    def features_and_rois(self, batch: dict[str, Any], select: Tensor | None) -> tuple[list[Tensor], list[int], Tensor, Tensor]:
        """Run the image encoder; (maps, strides, rows [R,2], rois [R,5] in the input frame)."""
        self.check_batch(batch)
        sel = batch["valid"] if select is None else select.to(torch.bool)
        rows = sel.nonzero()  # row-major (b, k)
        names = [lv.name for lv in self.all_levels]
        idx = [names.index(lv.name) for lv in self.levels]
        feat_size = batch["feat_size"][:, idx]
        maps, strides = self.image_encoder([batch["features"][lv.name] for lv in self.levels], feat_size)
        boxes = batch["boxes"][rows[:, 0], rows[:, 1]].float()
        scale = batch["scale"][rows[:, 0]].float()
        boxes = boxes * torch.cat([scale, scale], dim=1)
        rois = torch.cat([rows[:, :1].to(boxes.dtype), boxes], dim=1)
        return maps, strides, rows, rois

    def pool(self, maps: list[Tensor], strides: list[int], rois: Tensor, size: int) -> Tensor:
        """Fused multi-level RoIAlign (summed over the maps) -> ``[R, dim, size, size]``."""
        dtype = maps[0].dtype
        maps = [m.to(dtype) for m in maps]
        return multilevel_roi_align(
            maps, rois.to(dtype), [1.0 / s for s in strides], size, sampling_ratio=self.cfg.sampling_ratio, aligned=True
        )


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
        self.box_encoder = BoxEncoder(bd, cfg.box_encoder, cfg.box_encoder_layers, cfg.box_encoder_scale, query_dim=d,
                                      objects=cfg.box_object_attn)
        if cfg.mask_predictor == "dot":
            self.predictor: nn.Module = DotMaskPredictor(bd, d)
        else:
            self.predictor = Pointwise(bd, 1)
        self.iou_head = MaskIoUHead(bd, d) if cfg.iou_head else None
        self.mask_size = cfg.roi_size * cfg.mask_upsample

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
            logits = self.predictor(x, q) if self.cfg.mask_predictor == "dot" else self.predictor(x).squeeze(1)
            return logits, (self.iou_head(x, logits, q) if self.iou_head is not None else None)

        logits, iou_logit = run_in_chunks(boxes, rows.shape[0], self.training)
        return finish_output(logits, iou_logit, rows, self.cfg.mask_upsample)

    @staticmethod
    def _objects(batch: dict[str, Any], rows: Tensor, q_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every valid object of each selected box's image: (queries [R,K,d], boxes relative to the
        selected box [R,K,4], ignore [R,K]) for the box-to-object attention."""
        b = rows[:, 0]
        boxes = batch["boxes"].float()
        own = boxes[b, rows[:, 1]]
        return q_all[b], relative_boxes(own, boxes[b]).to(q_all.dtype), ~batch["valid"][b]


EVAL_CHUNK = 64  # boxes per pass at inference: [R, C, 32, 32] tensors then stay cache-sized (2x faster)


def run_in_chunks(fn: Any, n: int, training: bool) -> tuple[Tensor, Tensor | None]:
    """``fn(slice)`` over all ``n`` boxes at once (training) or in chunks of ``EVAL_CHUNK`` (inference:
    the per-box tensors of a 16-image validation batch would otherwise be ~150 MB each, memory-bound)."""
    if training or n <= EVAL_CHUNK:
        return fn(slice(0, n))
    parts = [fn(slice(i, min(i + EVAL_CHUNK, n))) for i in range(0, n, EVAL_CHUNK)]
    logits = torch.cat([p[0] for p in parts])
    iou = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return logits, iou


def relative_boxes(own: Tensor, others: Tensor) -> Tensor:
    """Boxes ``others`` [R,K,4] in the unit frame of ``own`` [R,4] (0..1 inside it), clamped to [-4, 5]."""
    x1, y1, x2, y2 = own.unbind(-1)
    w = (x2 - x1).clamp(min=1e-3)[:, None]
    h = (y2 - y1).clamp(min=1e-3)[:, None]
    rel = torch.stack([(others[..., 0] - x1[:, None]) / w, (others[..., 1] - y1[:, None]) / h,
                       (others[..., 2] - x1[:, None]) / w, (others[..., 3] - y1[:, None]) / h], dim=-1)
    return rel.clamp(-4.0, 5.0)


def finish_output(logits: Tensor, iou_logit: Tensor | None, rows: Tensor, upsample: int) -> dict[str, Tensor]:
    """The forward contract: ``mask_logits`` [R,M,M] float32, ``iou_pred`` [R] in [0,1] (1 without an
    IoU head), ``rows`` [R,2]; plus ``iou_logit`` [R] (what the IoU loss trains) when there is a head."""
    if upsample > 1:
        logits = F.interpolate(logits.unsqueeze(1), scale_factor=upsample, mode="bilinear", align_corners=False).squeeze(1)
    out = {"mask_logits": logits.float(), "rows": rows}
    if iou_logit is None:
        out["iou_pred"] = torch.ones(rows.shape[0], device=logits.device)
    else:
        out["iou_logit"] = iou_logit.float()
        out["iou_pred"] = torch.sigmoid(iou_logit.float())
    return out


def build_mask_net(cfg: MaskNetConfig, levels: Sequence[LevelSpec], query_dim: int) -> MaskNetBase:
    """The mask network ``cfg.head`` asks for, built for a cache's ``levels`` and ``query_dim``."""
    if cfg.head == "fcn":
        from mfdetr.model.fcn_head import FCNMaskNet

        return FCNMaskNet(cfg, levels, query_dim)
    if cfg.head == "mfdetr":
        return MaskNet(cfg, levels, query_dim)
    raise MfdetrError(f"unknown mask head {cfg.head!r}; choose 'mfdetr' or 'fcn'")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
