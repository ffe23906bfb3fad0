"""Matching predicted boxes to ground truth, and the mask targets cropped to the predicted boxes.

The detector is frozen, so the assignment of its boxes to ground-truth objects never changes: it is
computed once at extraction and stored in the cache (``match_ann_id``, ``match_iou``,
``mask_targets``); training then reads no annotation file and no image.

Default rule, ``"iou"`` (one-to-many): every kept predicted box is matched to the non-crowd
ground-truth object of highest box IoU, when that IoU is >= ``iou_threshold`` (0.5); otherwise it
has no target. Why this and not DETR's one-to-one Hungarian assignment:
- at inference *every* top-k box gets a mask, duplicates and near-duplicates included, and COCO mask
  AP scores all of them; a mask head trained only on the one Hungarian-chosen box per object never
  learns to paint the object from the slightly shifted duplicate boxes it will meet at test time;
- the mask head does not classify or de-duplicate (the frozen detector already did), so one-to-many
  targets cause none of the duplicate-prediction problems they cause in DETR training;
- it is exactly how Mask R-CNN assigns mask targets (every positive RoI, IoU >= 0.5, class-agnostic
  box matching) and it gives several times more training boxes per image;
- the class is ignored: a box around an object paints that object's mask whatever label the frozen
  detector gave it.
``"hungarian"`` is offered for comparison: DETR's cost (class 1 x -score if the predicted label equals
the GT label, L1 5 x on normalised cxcywh, GIoU 2 x -GIoU), ``scipy.optimize.linear_sum_assignment``,
one-to-one; pairs whose box IoU is below ``iou_threshold`` are dropped (their crop would not hold
the object; use threshold 0 to keep every pair).

Crowd annotations are never targets under either rule.

Mask target = the matched GT's full-image binary mask cropped to the PREDICTED box and resampled to
``M x M``: ``torchvision.ops.roi_align`` on the mask as float (``aligned=True``, ``sampling_ratio=2``,
``spatial_scale=1``: boxes and masks are both in original pixels), thresholded at >= 0.5. Row 0 is the
box's top edge. Stored bit-packed along the last axis (``np.packbits(axis=-1)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

MATCH_RULES = ("iou", "hungarian")
HUNGARIAN_WEIGHTS = {"class": 1.0, "l1": 5.0, "giou": 2.0}


def _as_tensor(x: Any, dtype: torch.dtype) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def box_area(b: Tensor) -> Tensor:
    """Area of xyxy boxes (0 for degenerate ones)."""
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU [Na, Nb] of xyxy boxes; 0 where the union is empty (degenerate boxes)."""
    a = a.double()
    b = b.double()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU [Na, Nb] of xyxy boxes."""
    a = a.double()
    b = b.double()
    iou = box_iou(a, b)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    elt = torch.minimum(a[:, None, :2], b[None, :, :2])
    erb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    ewh = (erb - elt).clamp(min=0)
    enclosing = ewh[..., 0] * ewh[..., 1]
    extra = torch.where(
        enclosing > 0, (enclosing - union) / enclosing.clamp(min=1e-12), torch.zeros_like(enclosing)
    )
    return iou - extra


def _cxcywh_norm(b: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = float(size[0]), float(size[1])
    cx = (b[:, 0] + b[:, 2]) / 2 / w
    cy = (b[:, 1] + b[:, 3]) / 2 / h
    bw = (b[:, 2] - b[:, 0]) / w
    bh = (b[:, 3] - b[:, 1]) / h
    return torch.stack([cx, cy, bw, bh], dim=1)


def hungarian_cost(
    pred_boxes: Tensor,
    pred_labels: Tensor,
    pred_scores: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    image_size: tuple[int, int],
) -> Tensor:
    """DETR matching cost [K, G] (float64): class + 5 x L1 (normalised cxcywh) + 2 x (-GIoU)."""
    same = pred_labels.long()[:, None] == gt_labels.long()[None, :]
    cost_class = -(pred_scores.double()[:, None] * same.double())
    cost_l1 = torch.cdist(
        _cxcywh_norm(pred_boxes.double(), image_size), _cxcywh_norm(gt_boxes.double(), image_size), p=1
    )
    cost_giou = -generalized_box_iou(pred_boxes, gt_boxes)
    w = HUNGARIAN_WEIGHTS
    return w["class"] * cost_class + w["l1"] * cost_l1 + w["giou"] * cost_giou


def match_boxes(
    pred_boxes: Any,
    gt_boxes: Any,
    gt_iscrowd: Any | None = None,
    rule: str = "iou",
    iou_threshold: float = 0.5,
    pred_labels: Any | None = None,
    pred_scores: Any | None = None,
    gt_labels: Any | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Match K predicted boxes to G ground-truth boxes (all xyxy, same frame).

    Returns ``(gt_index [K] int64, iou [K] float32)``: the matched GT's position in ``gt_boxes``
    (-1 none) and the box IoU with it (0 when none). Crowd GTs are never matched. ``"hungarian"``
    also needs pred_labels, pred_scores, gt_labels and image_size (h, w) for L1 normalisation.
    """
    pb = _as_tensor(pred_boxes, torch.float64).reshape(-1, 4)
    gb = _as_tensor(gt_boxes, torch.float64).reshape(-1, 4)
    k, g = pb.shape[0], gb.shape[0]
    gt_index = np.full(k, -1, dtype=np.int64)
    ious = np.zeros(k, dtype=np.float32)
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; use one of {MATCH_RULES}")
    crowd = (
        np.zeros(g, dtype=bool)
        if gt_iscrowd is None
        else np.asarray(_as_tensor(gt_iscrowd, torch.bool).numpy(), bool)
    )
    cand = np.flatnonzero(~crowd)
    if k == 0 or cand.size == 0:
        return gt_index, ious
    iou = box_iou(pb, gb[cand]).numpy()  # [K, G']
    if rule == "iou":
        best = iou.argmax(axis=1)  # ties -> the lowest GT position
        best_iou = iou[np.arange(k), best]
        ok = best_iou >= iou_threshold
        ok &= best_iou > 0  # a degenerate box never matches, even at threshold 0
        gt_index[ok] = cand[best[ok]]
        ious[ok] = best_iou[ok]
        return gt_index, ious
    from scipy.optimize import linear_sum_assignment

    if pred_labels is None or pred_scores is None or gt_labels is None or image_size is None:
        raise ValueError("hungarian matching needs pred_labels, pred_scores, gt_labels and image_size")
    cost = hungarian_cost(
        pb,
        _as_tensor(pred_labels, torch.int64),
        _as_tensor(pred_scores, torch.float64),
        gb[cand],
        _as_tensor(gt_labels, torch.int64)[cand],
        image_size,
    ).numpy()
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows, cols):
        if iou[r, c] >= iou_threshold and iou[r, c] > 0:
            gt_index[r] = cand[c]
            ious[r] = iou[r, c]
    return gt_index, ious


def preload() -> None:
    """Import what the mask crops need (torchvision's ops pull in ``torch._dynamo``: seconds of CPU,
    once per process), so that a writer process pays it at start, not on its first matched image."""
    import torchvision.ops  # noqa: F401


def crop_mask_targets(masks: Any, boxes: Any, gt_index: Any, size: int) -> np.ndarray:
    """GT masks cropped to the predicted boxes: ``[K, size, size]`` bool (all False where unmatched).

    masks: [G, H, W] bool full-image masks; boxes: [K, 4] xyxy predicted boxes (mask pixel frame);
    gt_index: [K] int, position in ``masks`` or -1.
    """
    from torchvision.ops import roi_align

    gi = np.asarray(gt_index, dtype=np.int64).reshape(-1)
    k = gi.shape[0]
    out = np.zeros((k, size, size), dtype=bool)
    rows = np.flatnonzero(gi >= 0)
    if rows.size == 0:
        return out
    used, inverse = np.unique(gi[rows], return_inverse=True)
    m = _as_tensor(masks, torch.bool)[torch.as_tensor(used)].to(torch.float32)[:, None]  # [U,1,H,W]
    b = _as_tensor(boxes, torch.float32).reshape(-1, 4)[torch.as_tensor(rows)]
    rois = torch.cat([torch.as_tensor(inverse, dtype=torch.float32)[:, None], b], dim=1)
    crops = roi_align(m, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    out[rows] = (crops[:, 0] >= 0.5).numpy()
    return out


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """[..., M, M] bool -> [..., M, M/8] uint8 (``np.packbits(axis=-1)``)."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=-1)


def unpack_masks(packed: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``pack_masks``: [..., M, M/8] uint8 -> [..., M, M] bool."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=size).astype(bool)


def compute_targets(
    boxes: Any,
    labels: Any,
    scores: Any,
    num_boxes: int,
    gt: dict[str, Any],
    rule: str = "iou",
    iou_threshold: float = 0.5,
    mask_size: int = 64,
) -> dict[str, np.ndarray]:
    """Matching + targets for one image's K (padded) predicted rows, the first ``num_boxes`` valid.

    gt: ``boxes [G,4]``, ``labels [G]``, ``iscrowd [G]``, ``ann_ids [G]``, ``masks [G,H,W]`` and
    ``orig_size (H, W)``. Returns ``match_ann_id [K] int64``, ``match_iou [K] float32``,
    ``mask_targets [K, M, M/8] uint8`` (packed).
    """
    pb = _as_tensor(boxes, torch.float32).reshape(-1, 4)
    k = pb.shape[0]
    n = int(num_boxes)
    ann_ids = np.asarray(_as_tensor(gt["ann_ids"], torch.int64).numpy()).reshape(-1)
    gt_index = np.full(k, -1, dtype=np.int64)
    ious = np.zeros(k, dtype=np.float32)
    if n > 0 and ann_ids.size > 0:
        gi, iu = match_boxes(
            pb[:n],
            gt["boxes"],
            gt.get("iscrowd"),
            rule,
            iou_threshold,
            pred_labels=_as_tensor(labels, torch.int64)[:n],
            pred_scores=_as_tensor(scores, torch.float32)[:n],
            gt_labels=gt["labels"],
            image_size=tuple(gt["orig_size"]),
        )
        gt_index[:n], ious[:n] = gi, iu
    match_ann = np.where(gt_index >= 0, ann_ids[np.clip(gt_index, 0, None)] if ann_ids.size else -1, -1)
    masks = (
        crop_mask_targets(gt["masks"], pb, gt_index, mask_size)
        if (gt_index >= 0).any()
        else np.zeros((k, mask_size, mask_size), dtype=bool)
    )
    return {
        "match_ann_id": match_ann.astype(np.int64),
        "match_iou": ious,
        "mask_targets": pack_masks(masks),
    }
