"""The batch dict the mask network consumes, built from cache records or from live detections.

One format serves training (records read from the cache) and ``predict`` (DetectorOutputs from a
live detector), so the mask network never knows where its inputs came from.

A *record* (one image, as ``CacheReader`` / ``CacheDataset.__getitem__`` return it):
    index: int, image_id: int, orig_size: (H0, W0), input_size: (h_in, w_in), scale: (sx, sy),
    num_boxes: int, boxes [K,4] f32 original px, scores [K] f32, labels [K] i64 (-1 = pad),
    queries [K,D] f32, features {name: [C,h,w] f32 cropped to the true size},
    and when the cache has targets: match_ann_id [K] i64 (-1 none), match_iou [K] f32,
    mask_targets [K,M,M] bool (GT mask cropped to the PREDICTED box).

A *batch* (``collate_records``):
    index [B] i64, image_id [B] i64, orig_size [B,2] i64, input_size [B,2] i64, scale [B,2] f32,
    boxes [B,K,4] f32 (original px), scores [B,K] f32, labels [B,K] i64, valid [B,K] bool,
    queries [B,K,D] f32, features {name: [B,C,Hb,Wb] f32} zero-padded bottom/right to the batch
    max, feat_size [B,L,2] i64 true (h,w) per level in ``levels`` order,
    optional match_ann_id [B,K] i64, match_iou [B,K] f32, mask_targets [B,K,M,M] bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mfdetr.detectors.base import DetectorOutput, LevelSpec

_TARGET_KEYS = ("match_ann_id", "match_iou", "mask_targets")


def pad_stack(maps: Sequence[Tensor]) -> Tensor:
    """[C,h_i,w_i] maps -> [B,C,max h,max w], zero-padded bottom/right."""
    c = maps[0].shape[0]
    hb = max(m.shape[1] for m in maps)
    wb = max(m.shape[2] for m in maps)
    out = maps[0].new_zeros((len(maps), c, hb, wb))
    for i, m in enumerate(maps):
        out[i, :, : m.shape[1], : m.shape[2]] = m
    return out


def collate_records(records: Sequence[dict[str, Any]], levels: Sequence[LevelSpec]) -> dict[str, Any]:
    """Stack per-image records (all with the same K) into one batch dict (see module doc)."""
    names = [lv.name for lv in levels]
    k = records[0]["boxes"].shape[0]
    batch: dict[str, Any] = {
        "index": torch.tensor([r["index"] for r in records], dtype=torch.int64),
        "image_id": torch.tensor([r["image_id"] for r in records], dtype=torch.int64),
        "orig_size": torch.tensor([list(r["orig_size"]) for r in records], dtype=torch.int64),
        "input_size": torch.tensor([list(r["input_size"]) for r in records], dtype=torch.int64),
        "scale": torch.tensor([list(r["scale"]) for r in records], dtype=torch.float32),
        "boxes": torch.stack([r["boxes"].float() for r in records]),
        "scores": torch.stack([r["scores"].float() for r in records]),
        "labels": torch.stack([r["labels"].long() for r in records]),
        "valid": torch.stack([torch.arange(k) < int(r["num_boxes"]) for r in records]),
        "queries": torch.stack([r["queries"].float() for r in records]),
        "features": {n: pad_stack([r["features"][n].float() for r in records]) for n in names},
        "feat_size": torch.tensor(
            [[list(r["features"][n].shape[1:]) for n in names] for r in records], dtype=torch.int64
        ),
    }
    for key in _TARGET_KEYS:
        if key in records[0]:
            batch[key] = torch.stack([torch.as_tensor(r[key]) for r in records])
    return batch


def records_from_detections(
    outputs: Sequence[DetectorOutput], topk: int | None = None
) -> list[dict[str, Any]]:
    """Live path: DetectorOutputs -> records (padded to a common K = ``topk`` or the max count)."""
    k = topk if topk is not None else max(1, max(int(o.boxes.shape[0]) for o in outputs))
    records = []
    for i, o in enumerate(outputs):
        n = min(int(o.boxes.shape[0]), k)
        d = o.queries.shape[1] if o.queries.ndim == 2 else 0
        boxes = o.boxes.new_zeros((k, 4))
        boxes[:n] = o.boxes[:n]
        scores = o.scores.new_zeros((k,))
        scores[:n] = o.scores[:n]
        labels = torch.full((k,), -1, dtype=torch.int64, device=o.labels.device)
        labels[:n] = o.labels[:n]
        queries = o.queries.new_zeros((k, d))
        queries[:n] = o.queries[:n]
        records.append(
            {
                "index": i,
                "image_id": int(o.extras["image_id"]) if "image_id" in o.extras else i,
                "orig_size": tuple(o.orig_size),
                "input_size": tuple(o.input_size),
                "scale": tuple(o.scale),
                "num_boxes": n,
                "boxes": boxes,
                "scores": scores,
                "labels": labels,
                "queries": queries,
                "features": o.features,
            }
        )
    return records


def batch_to(batch: dict[str, Any], device: torch.device | str, non_blocking: bool = True) -> dict[str, Any]:
    """Move every tensor of a batch (features dict included) to ``device``; ``non_blocking`` overlaps
    host-to-GPU copies from pinned memory (the train loader pins on CUDA) with compute."""
    out: dict[str, Any] = {}
    for key, v in batch.items():
        if isinstance(v, Tensor):
            out[key] = v.to(device, non_blocking=non_blocking)
        elif isinstance(v, dict):
            out[key] = {n: t.to(device, non_blocking=non_blocking) for n, t in v.items()}
        else:
            out[key] = v
    return out
