"""Degenerate COCO annotations: the one rule every stage uses to skip them.

An annotation is degenerate when it cannot be a training target or a ground-truth instance: a box with
zero width or height, or lying outside its image; an empty segmentation; a polygon segmentation with no
part of three or more points (pycocotools would read a 4-number part as a box and fail on shorter ones);
an RLE mask without a foreground pixel. The COCO reader drops them (and lists
them in ``CocoDataset.degenerate``), ``extract`` reports them by annotation id, and ``evaluate`` turns
them into ignored regions (a detection on one is neither a hit nor a false positive), so no stage
scores an instance another stage skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _polygon_reason(segm: list) -> str | None:
    if not segm:
        return "empty segmentation"
    parts = [p for p in segm if isinstance(p, list) and len(p) >= 6]
    if not parts:
        points = max((len(p) // 2 for p in segm if isinstance(p, list)), default=0)
        return f"polygon with fewer than 3 points ({points} point(s))"
    return None


def _rle_reason(segm: Mapping[str, Any]) -> str | None:
    counts = segm.get("counts")
    if isinstance(counts, list):
        if sum(counts[1::2]) == 0:  # odd runs are the foreground
            return "empty RLE mask (no foreground pixel)"
        return None
    if not counts:
        return "empty RLE mask (no foreground pixel)"
    from pycocotools import mask as mask_utils

    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    rle = {"size": list(segm["size"]), "counts": raw}
    if int(mask_utils.area(rle)) == 0:
        return "empty RLE mask (no foreground pixel)"
    return None


def degenerate_reason(ann: Mapping[str, Any], height: int, width: int, need_segm: bool = True) -> str | None:
    """Why ``ann`` (a COCO annotation dict of an ``height`` x ``width`` image) is degenerate, or None.

    ``need_segm=False`` checks the box only (box-only datasets). Assumes the structure is valid (the
    reader's validation ran first: bbox is four numbers, segmentation a list or an RLE dict)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w <= 0 or h <= 0:
        return f"zero-area box (width {w:g}, height {h:g})"
    if min(x + w, width) <= max(x, 0.0) or min(y + h, height) <= max(y, 0.0):
        return f"box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {width}x{height} image"
    if not need_segm or "segmentation" not in ann:
        return None
    segm = ann["segmentation"]
    if isinstance(segm, list):
        return _polygon_reason(segm)
    if isinstance(segm, Mapping):
        return _rle_reason(segm)
    return None


def find_degenerate(
    annotations: Iterable[Mapping[str, Any]], images: Mapping[int, Mapping[str, Any]], need_segm: bool = True
) -> list[tuple[int, str]]:
    """``[(annotation id, reason)]`` of the degenerate annotations, in the given order; ``images`` maps an
    image id to its COCO image dict (height, width)."""
    out = []
    for ann in annotations:
        img = images[ann["image_id"]]
        reason = degenerate_reason(ann, int(img["height"]), int(img["width"]), need_segm)
        if reason is not None:
            out.append((int(ann["id"]), reason))
    return out


def describe_degenerate(found: list[tuple[int, str]], limit: int = 10) -> str:
    """One line naming the skipped annotations (first ``limit`` by id), for warnings."""
    shown = "; ".join(f"annotation id {aid}: {reason}" for aid, reason in found[:limit])
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return (
        f"skipped {len(found)} degenerate annotation(s) (no target or ground truth in any stage): "
        f"{shown}{more}. Fix or remove them in the annotation file to silence this warning."
    )
