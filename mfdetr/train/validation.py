"""Validation during training: mean mask IoU of the matched boxes and the IoU head's error."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mfdetr.cache.batch import batch_to
from mfdetr.model.losses import mask_iou
from mfdetr.train.runtime import autocast_ctx
from mfdetr.train.selection import val_select


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    amp: str = "off",
    max_images: int = 0,
    max_boxes: int = 0,
) -> dict[str, float]:
    """Mean mask IoU of the matched boxes (mask > 0.5 vs the cached crop, at the crop's resolution),
    and the IoU head's mean absolute error on them; ``max_boxes``: see ``val_select``."""
    was_training = model.training
    model.eval()
    inter_sum, n, err_sum, images = 0.0, 0, 0.0, 0
    for batch in loader:
        batch = batch_to(batch, device)
        select = val_select(batch, max_boxes)
        if bool(select.any()):
            with autocast_ctx(device, amp):
                out = model(batch, select)
            rows = out["rows"]
            targets = batch["mask_targets"][rows[:, 0], rows[:, 1]]
            iou = mask_iou(out["mask_logits"].float(), targets)
            inter_sum += float(iou.sum())
            err_sum += float((out["iou_pred"].float() - iou).abs().sum())
            n += int(iou.numel())
        images += int(batch["valid"].shape[0])
        if max_images and images >= max_images:
            break
    model.train(was_training)
    return {
        "val_miou": inter_sum / max(n, 1),
        "val_iou_head_mae": err_sum / max(n, 1),
        "val_boxes": float(n),
        "val_images": float(images),
    }
