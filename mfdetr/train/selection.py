"""Which boxes of a batch a step trains on (``train_select``, random) or validation scores
(``val_select``, deterministic); both return ``[B, K]`` bool masks over the batch's box slots."""

from __future__ import annotations

from typing import Any

import torch


def train_select(batch: dict[str, Any], max_matched: int, n_unmatched: int) -> torch.Tensor:
    """Boxes a step trains on, ``[B, K]`` bool: up to ``max_matched`` matched boxes per image (random,
    0 = all) and up to ``n_unmatched`` unmatched valid ones (for the IoU head's target 0).

    Distinct objects first: with one-to-many matching (and top-k over query x class, where one query
    shows up under several labels) an object can own many boxes; the cap takes one box of every
    matched annotation (at random) before a second box of any. Draws from the global torch RNG
    (saved in checkpoints: exact resume). Never empty: an image batch without any valid box selects
    its first row (a zero box; its loss weight is 0).
    """
    valid = batch["valid"]
    ann = batch["match_ann_id"]
    matched = valid & (ann >= 0)
    prio = torch.rand(valid.shape, device=valid.device)
    if max_matched > 0:
        same = (ann[:, :, None] == ann[:, None, :]) & matched[:, :, None] & matched[:, None, :]
        rank = (same & (prio[:, None, :] > prio[:, :, None])).sum(-1)  # same-object boxes drawn before
        sel = top_per_row(matched, prio - rank.to(prio.dtype), max_matched)
    else:
        sel = matched.clone()
    if n_unmatched > 0:
        sel |= top_per_row(valid & ~matched, prio, n_unmatched)
    if not bool(sel.any()):
        if bool(valid.any()):
            sel = valid.clone()
        else:
            sel = torch.zeros_like(valid)
            sel[0, 0] = True
    return sel


def top_per_row(mask: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0:
        return mask.clone()
    score = torch.where(mask, score, torch.full_like(score, -1e9))
    k = min(n, mask.shape[1])
    idx = score.topk(k, dim=1).indices
    out = torch.zeros_like(mask)
    out.scatter_(1, idx, True)
    return out & mask


def val_select(batch: dict[str, Any], max_boxes: int = 0) -> torch.Tensor:
    """Matched boxes to validate, ``[B, K]`` bool: all (``max_boxes`` 0), or per image up to
    ``max_boxes``, one box per matched object first (its highest-scoring box), then the next best
    boxes -- deterministic. Top-k over query x class gives ~9 boxes per object here; the best-scored
    box of each object is what AP mostly sees."""
    matched = batch["valid"] & (batch["match_ann_id"] >= 0)
    if max_boxes <= 0:
        return matched
    ann, score = batch["match_ann_id"], batch["scores"].float()
    same = (ann[:, :, None] == ann[:, None, :]) & matched[:, :, None] & matched[:, None, :]
    k = ann.shape[1]
    idx = torch.arange(k, device=ann.device)
    better = (score[:, None, :] > score[:, :, None]) | (
        (score[:, None, :] == score[:, :, None]) & (idx[None, :] < idx[:, None])[None]
    )
    rank = (same & better).sum(-1)
    return top_per_row(matched, score.clamp(0, 1) * 0.5 - rank.to(score.dtype), max_boxes)
