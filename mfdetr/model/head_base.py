"""What every mask head shares: level bookkeeping, input checks, the image encoder, box selection and
RoIs, chunked inference and the output contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.base import LevelSpec
from mfdetr.detectors.pixels import is_pixel_level
from mfdetr.errors import MfdetrError
from mfdetr.model.config import MaskNetConfig
from mfdetr.model.image_encoder import ImageEncoder
from mfdetr.model.losses import uncertain_points
from mfdetr.model.pixel_refine import PixelRefiner
from mfdetr.ops.roi_align import multilevel_roi_align


class MaskNetBase(nn.Module):
    """What every head shares: level bookkeeping, input checks, box selection and RoIs."""

    cfg: MaskNetConfig
    levels: list[LevelSpec]
    query_dim: int
    mask_size: int
    pixel_level: LevelSpec | None
    refiner: PixelRefiner | None

    def _init_base(
        self, cfg: MaskNetConfig, levels: Sequence[LevelSpec], query_dim: int, fine_dim: int | None = None
    ) -> None:
        self.cfg = cfg
        self.all_levels = list(levels)
        self.query_dim = int(query_dim)
        by_name = {lv.name: lv for lv in levels}
        names = list(cfg.levels) if cfg.levels else [lv.name for lv in levels if not is_pixel_level(lv)]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise MfdetrError(
                f"mask network config asks for level(s) {missing} but the cache has levels "
                f"{[lv.name for lv in levels]}; fix model.levels"
            )
        if any(is_pixel_level(n) for n in names):
            raise MfdetrError(
                f"model.levels {names} lists a pixel level: pixel levels feed the pixel refinement "
                "(model.pixel_refine), not the image encoder; leave them out of model.levels"
            )
        self.levels = [by_name[n] for n in names]
        # the finest pixel level, for the pixel refinement of the heads that have one
        pixels = sorted((lv for lv in levels if is_pixel_level(lv)), key=lambda lv: lv.stride)
        self.pixel_level = pixels[0] if pixels else None
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

    def _init_refiner(self, feat_dim: int, mask_size: int) -> None:
        """The pixel refinement over box features of ``feat_dim`` channels when the cache has a pixel level
        and ``cfg.pixel_refine > 0``; ``mask_size``: the head's own mask side without it."""
        cfg = self.cfg
        self.refiner = (
            PixelRefiner(
                self.pixel_level, feat_dim, cfg.pixel_refine, cfg.refine_dim, colour=cfg.refine_colour
            )
            if self.pixel_level is not None and cfg.pixel_refine > 0
            else None
        )
        self.mask_size = cfg.pixel_refine if self.refiner is not None else mask_size

    def refine(
        self,
        batch: dict[str, Any],
        logits: Tensor,
        feats: Tensor,
        rois: Tensor,
        refined: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """One chunk of boxes' logits after the pixel refinement: at inference the refined ``[r,M,M]``;
        in training the coarse ones, with (refined logits [r,P], points [r,P,2]) at the
        ``refine_points`` most uncertain points of the coarse logits appended to ``refined``."""
        if self.refiner is None or self.pixel_level is None:
            return logits
        pixels = batch["features"][self.pixel_level.name]
        f = self.refiner.project(feats)
        if not self.training:
            return self.refiner.dense(logits, f, pixels, rois, self.cfg.refine_infer_points)
        coords = uncertain_points(logits, self.cfg.refine_points)
        refined.append((self.refiner.point_logits(logits, f, pixels, rois, coords), coords))
        return logits

    def output(
        self, logits: Tensor, iou_logit: Tensor | None, rows: Tensor, refined: list[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """The forward contract (``finish_output``), plus ``refine_logits`` / ``refine_coords`` in training."""
        out = finish_output(
            logits, iou_logit, rows, 1 if self.refiner is not None else self.cfg.mask_upsample
        )
        if refined:
            out["refine_logits"] = torch.cat([r[0] for r in refined])
            out["refine_coords"] = torch.cat([r[1] for r in refined])
        return out

    def check_batch(self, batch: dict[str, Any]) -> None:
        """A clear error when the batch's levels, channels or query width do not fit this network."""
        feats = batch["features"]
        for lv in self.levels + ([self.pixel_level] if self.pixel_level is not None else []):
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
            raise MfdetrError(
                f"the batch's queries have width {d} but the mask network was built for {self.query_dim}"
            )

    def features_and_rois(
        self, batch: dict[str, Any], select: Tensor | None
    ) -> tuple[list[Tensor], list[int], Tensor, Tensor]:
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
            # rois stay float32: bf16 box corners near 1000 px are off by 4-8 px
            maps,
            rois.float(),
            [1.0 / s for s in strides],
            size,
            sampling_ratio=self.cfg.sampling_ratio,
            aligned=True,
        )


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


def finish_output(logits: Tensor, iou_logit: Tensor | None, rows: Tensor, upsample: int) -> dict[str, Tensor]:
    """The forward contract: ``mask_logits`` [R,M,M] float32, ``iou_pred`` [R] in [0,1] (1 without an
    IoU head), ``rows`` [R,2]; plus ``iou_logit`` [R] (what the IoU loss trains) when there is a head."""
    if upsample > 1:
        logits = F.interpolate(
            logits.unsqueeze(1), scale_factor=upsample, mode="bilinear", align_corners=False
        ).squeeze(1)
    out = {"mask_logits": logits.float(), "rows": rows}
    if iou_logit is None:
        out["iou_pred"] = torch.ones(rows.shape[0], device=logits.device)
    else:
        out["iou_logit"] = iou_logit.float()
        out["iou_pred"] = torch.sigmoid(iou_logit.float())
    return out
