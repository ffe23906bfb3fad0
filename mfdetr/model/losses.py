"""Mask losses: point-sampled sigmoid BCE + dice (Mask2Former importance sampling) and mask-IoU regression.

Coordinates: a point is ``(x, y)`` in ``[0, 1]^2`` of the BOX (0 = left/top edge, 1 = right/bottom).
Logits ``[R, M, M]`` and target crops ``[R, Mt, Mt]`` both cover the box exactly, cell ``i`` centred at
``(i + 0.5) / M``, so ``grid_sample(align_corners=False)`` reads both at the same place whatever
their resolutions (the net's 32x32 logits, bilinearly, against the cache's 64x64 crops, by nearest
cell: hard 0/1 labels).

Which boxes: the mask loss uses matched boxes only (``match_ann_id >= 0``); the IoU head regresses
the IoU of its thresholded mask with the target crop on matched boxes and, when
``LossConfig.iou_unmatched``, 0 on a few sampled unmatched valid boxes (false positives and
duplicates): with final score = detection score x predicted IoU this down-weights them, as mask
scoring is meant to, at the cost of a few extra boxes per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.model.config import LossConfig


def point_sample(maps: Tensor, coords: Tensor, mode: str = "bilinear") -> Tensor:
    """Values of ``maps`` [R,H,W] at ``coords`` [R,P,2] (x, y in [0,1]) -> [R,P] (bilinear or nearest)."""
    grid = (2.0 * coords - 1.0).unsqueeze(1).to(maps.dtype)  # [R,1,P,2]
    out = F.grid_sample(maps.unsqueeze(1), grid, mode=mode, padding_mode="border", align_corners=False)
    return out[:, 0, 0]


@torch.no_grad()
def uncertain_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former's point selection: [R,P,2] coords, mostly where |logit| is smallest.

    Draws ``oversample_ratio * P`` uniform points, keeps the ``importance_sample_ratio * P`` most
    uncertain (-|logit|, read bilinearly), and fills the rest with fresh uniform points.
    """
    r = logits.shape[0]
    dev = logits.device
    n_over = max(int(num_points * oversample_ratio), num_points)
    cand = torch.rand(r, n_over, 2, device=dev, generator=generator)
    unc = -point_sample(logits.float(), cand).abs()
    n_imp = int(importance_sample_ratio * num_points)
    n_rand = num_points - n_imp
    idx = unc.topk(n_imp, dim=1).indices
    chosen = torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if n_rand > 0:
        chosen = torch.cat([chosen, torch.rand(r, n_rand, 2, device=dev, generator=generator)], dim=1)
    return chosen


def sigmoid_bce_dice(point_logits: Tensor, point_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-mask BCE (mean over points) and dice ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``: [R], [R]."""
    bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(dim=1)
    p = point_logits.sigmoid()
    num = 2 * (p * point_labels).sum(dim=1) + 1
    den = p.sum(dim=1) + point_labels.sum(dim=1) + 1
    return bce, 1 - num / den


def resize_logits(logits: Tensor, size: int) -> Tensor:
    """[R,M,M] -> [R,size,size] bilinear with the box-frame convention (align_corners=False)."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    return F.interpolate(
        logits.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False
    ).squeeze(1)


@torch.no_grad()
def boundary_points(targets: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """[R,n,2] points on the boundary cells of ``targets`` [R,Mt,Mt] (a cell whose 3x3 neighbourhood
    is not constant), uniform within the chosen cell; uniform over the box for an empty boundary."""
    r, mt = targets.shape[0], targets.shape[-1]
    t = targets.float().unsqueeze(1)
    edge = (F.max_pool2d(t, 3, 1, 1) - (-F.max_pool2d(-t, 3, 1, 1)))[:, 0].flatten(1)  # 1 on boundary cells
    w = edge + 1e-6  # an object-free (or all-object) crop falls back to uniform cells
    idx = torch.multinomial(w, n, replacement=True, generator=generator)
    jitter = torch.rand(r, n, 2, device=targets.device, generator=generator)
    cells = torch.stack([idx % mt, idx // mt], dim=-1).to(jitter.dtype)
    return (cells + jitter) / mt


@torch.no_grad()
def overlap_points(
    batch: dict[str, Any],
    rows: Tensor,
    n: int,
    oversample: float = 3.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[R,n,2] points (box frame of each row ``rows`` [R,2]) where another instance lies in the box.

    The other instance: the box of a different matched annotation of the same image with the largest
    intersection. Candidates are drawn uniformly in that intersection and the ones its own target crop
    marks as its pixels come first; a row without an overlapping instance gets uniform points.
    """
    dev = rows.device
    boxes = batch["boxes"].float()
    ann = batch["match_ann_id"]
    b, k = rows[:, 0], rows[:, 1]
    own = boxes[b, k]  # [R,4]
    others = boxes[b]  # [R,K,4]
    lo = torch.maximum(own[:, None, :2], others[..., :2])
    hi = torch.minimum(own[:, None, 2:], others[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    cand_ok = batch["valid"][b] & (ann[b] >= 0) & (ann[b] != ann[b, k][:, None])
    inter = torch.where(cand_ok, inter, torch.zeros_like(inter))
    best, j = inter.max(dim=1)
    has = best > 0
    wh = (own[:, 2:] - own[:, :2]).clamp(min=1e-3)
    ar = torch.arange(rows.shape[0], device=dev)
    lo_u = ((lo[ar, j] - own[:, :2]) / wh).clamp(0, 1)  # intersection in this box's unit frame
    hi_u = ((hi[ar, j] - own[:, :2]) / wh).clamp(0, 1)
    lo_u = torch.where(has[:, None], lo_u, torch.zeros_like(lo_u))
    hi_u = torch.where(has[:, None], hi_u, torch.ones_like(hi_u))
    n_over = max(int(n * oversample), n)
    u = torch.rand(rows.shape[0], n_over, 2, device=dev, generator=generator)
    cand = lo_u[:, None] + u * (hi_u - lo_u)[:, None]
    other = others[ar, j]
    owh = (other[:, 2:] - other[:, :2]).clamp(min=1e-3)
    in_other = (own[:, None, :2] + cand * wh[:, None] - other[:, None, :2]) / owh[:, None]
    theirs = point_sample(batch["mask_targets"][b, j].float(), in_other.clamp(0, 1), mode="nearest")
    prio = theirs * has[:, None].float() + 0.5 * torch.rand(theirs.shape, device=dev, generator=generator)
    idx = prio.topk(n, dim=1).indices
    return torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, 2))


def mask_loss(
    logits: Tensor,
    targets: Tensor,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    extra: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean BCE and dice over the masks: logits [R,M,M] vs bool/float targets [R,Mt,Mt].

    ``extra`` [R,P',2]: more points for the ``"point"`` loss (overlap points, drawn by the caller,
    who sees the other instances); boundary points (``cfg.boundary_points``) are drawn here.
    """
    if logits.shape[0] == 0:
        z = logits.sum() * 0.0
        return z, z
    t = targets.to(logits.dtype)
    if cfg.mask_loss == "dense":
        pl = resize_logits(logits, t.shape[-1]).flatten(1)
        bce, dice = sigmoid_bce_dice(pl, t.flatten(1))
    else:
        coords = uncertain_points(
            logits, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio, generator
        )
        more = [] if extra is None else [extra.to(coords.dtype)]
        if cfg.boundary_points > 0:
            more.append(boundary_points(targets, cfg.boundary_points, generator))
        if more:
            coords = torch.cat([coords] + more, dim=1)
        # targets by nearest cell: a crop cell IS the GT sampled at its centre, so labels stay 0/1 and
        # the BCE can reach 0 (bilinear labels put a soft, irreducible band along every boundary,
        # right where the importance sampling concentrates the points)
        bce, dice = sigmoid_bce_dice(point_sample(logits, coords), point_sample(t, coords, mode="nearest"))
    return bce.mean(), dice.mean()


@torch.no_grad()
def mask_iou(logits: Tensor, targets: Tensor, threshold: float = 0.0) -> Tensor:
    """IoU per box of ``logits > threshold`` (resized to the target resolution) vs targets: [R].

    Both empty counts as IoU 1.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((0,))
    pred = resize_logits(logits.float(), targets.shape[-1]) > threshold
    t = targets.bool()
    inter = (pred & t).flatten(1).sum(1).float()
    union = (pred | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_regression(logit: Tensor, target: Tensor, kind: str = "bce") -> Tensor:
    """Mask-IoU regression from the IoU head's logits (``iou_pred = sigmoid(logit)``), mean over boxes.

    ``bce``: binary cross-entropy with the soft IoU target minus the target's entropy (= the KL
    divergence, 0 when exact; gradient ``sigmoid - target``: it never vanishes, unlike an L2 through a
    saturated sigmoid); ``l2`` / ``smooth_l1``: on ``sigmoid(logit)``.
    """
    if logit.numel() == 0:
        return logit.sum() * 0.0
    if kind == "bce":
        # minus the target's own entropy: a KL divergence, 0 at a perfect prediction (same gradient)
        t = target.clamp(0, 1)
        ent = -(torch.xlogy(t, t) + torch.xlogy(1 - t, 1 - t))
        return (F.binary_cross_entropy_with_logits(logit, t, reduction="none") - ent).mean()
    pred = logit.sigmoid()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=0.1)
    return F.mse_loss(pred, target)


def compute_losses(
    out: dict[str, Tensor], batch: dict[str, Any], cfg: LossConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts for a forward ``out`` over rows of ``batch`` (with targets).

    Matched rows (``match_ann_id >= 0``) get BCE + dice and an IoU target = IoU of their thresholded
    mask with the crop; unmatched rows (when present in ``out``) only an IoU target of 0. The IoU
    loss reads ``out["iou_logit"]`` (absent when the network has no IoU head: no IoU loss).
    Every output takes part in the graph (DDP needs every parameter used on every rank).
    """
    rows = out["rows"]
    logits = out["mask_logits"]
    iou_pred = out.get("iou_logit")
    has_iou_head = iou_pred is not None
    if iou_pred is None:
        iou_pred = logits.new_zeros((logits.shape[0],))
    matched = batch["match_ann_id"][rows[:, 0], rows[:, 1]] >= 0
    m_logits = logits[matched]
    m_targets = batch["mask_targets"][rows[:, 0], rows[:, 1]][matched]
    extra = None
    if cfg.overlap_points > 0 and cfg.mask_loss == "point" and bool(matched.any()):
        extra = overlap_points(batch, rows[matched], cfg.overlap_points, cfg.oversample_ratio, generator)
    bce, dice = mask_loss(m_logits, m_targets, cfg, generator, extra)
    if "refine_logits" in out:  # the pixel refinement, at the points the network refined
        r_logits = out["refine_logits"]
        if bool(matched.any()):
            labels = point_sample(m_targets.to(r_logits.dtype), out["refine_coords"][matched], mode="nearest")
            r_bce, r_dice = sigmoid_bce_dice(r_logits[matched], labels)
            bce, dice = bce + r_bce.mean(), dice + r_dice.mean()
        logits = torch.cat([logits.flatten(1), r_logits], dim=1)  # keeps every output in the graph
    iou_t = torch.zeros_like(iou_pred)
    if matched.any():
        iou_t[matched] = mask_iou(m_logits.detach(), m_targets)
    use = matched if not cfg.iou_unmatched else torch.ones_like(matched)
    l_iou = iou_regression(iou_pred[use], iou_t[use], cfg.iou_loss) if has_iou_head else iou_pred.sum() * 0.0
    total = cfg.bce_weight * bce + cfg.dice_weight * dice + cfg.iou_weight * l_iou
    total = total + 0.0 * (logits.sum() + iou_pred.sum())
    parts = {
        "loss_bce": float(bce.detach()),
        "loss_dice": float(dice.detach()),
        "loss_iou": float(l_iou.detach()),
        "num_masks": int(matched.sum()),
    }
    return total, parts
