"""Ground truth for evaluation: the COCO annotation file read with clear errors, degenerate annotations
turned into ignored regions, and the occluded-instance subset.

- :func:`load_ground_truth` reads the JSON (a syntax error names the file, line and column), checks the
  fields COCOeval needs, and replaces every degenerate annotation (the rule every stage shares,
  :mod:`mfdetr.data.annotations`: empty segmentation, no polygon of at least 3 points, an empty RLE, a
  zero-area box) by its box, *ignored*: ``area = -1`` lies outside every COCOeval area range, so a
  detection matched to it is neither a true nor a false positive (the way crowd regions are ignored,
  with the ordinary IoU and one match per region). Training never sees them as targets either.
- :func:`occluded_ground_truth` keeps as evaluated instances only the occluded ones and ignores the rest
  the same way (see :func:`occlusion_coverage` for the definition).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from mfdetr.data.annotations import find_degenerate
from mfdetr.data.coco import ann_to_rle
from mfdetr.errors import MfdetrError

OCCLUSION_THRESHOLD = 0.10
IGNORED_AREA = -1.0  # below every COCOeval area range: the annotation is ignored in all of them


@dataclass
class GroundTruth:
    """A COCO annotation file ready for COCOeval: ``dataset`` is the (repaired) dict."""

    dataset: dict[str, Any]
    path: Path | None = None
    degenerate: list[tuple[int, str]] = field(default_factory=list)  # (annotation id, reason): ignored
    imgs: dict[int, dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.imgs = {int(im["id"]): im for im in self.dataset.get("images", [])}

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the annotation file"

    def categories(self) -> list[dict[str, Any]]:
        return list(self.dataset.get("categories", []))


def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """``json.load`` of ``path``; a missing file or a syntax error is one clear MfdetrError."""
    path = Path(path)
    if not path.is_file():
        raise MfdetrError(f"{what} {path} does not exist: pass --annotations")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MfdetrError(f"cannot read {what} {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MfdetrError(
            f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
            "fix the file or pass another with --annotations"
        ) from None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_annotation(a: Any, imgs: dict[int, dict[str, Any]], path: Path) -> None:
    if not isinstance(a, dict):
        raise MfdetrError(f"annotation file {path}: annotation {a!r:.60} must be a JSON object")
    where = f"annotation file {path}: annotation id {a.get('id')!r}"
    missing = [k for k in ("id", "image_id", "category_id") if not isinstance(a.get(k), int)]
    if missing:
        raise MfdetrError(f"{where} has no integer {missing}")
    b = a.get("bbox")
    if not (isinstance(b, list) and len(b) == 4 and all(_is_num(v) for v in b)):
        raise MfdetrError(f"{where} needs a 'bbox' of four numbers [x, y, width, height]")
    segm = a.get("segmentation")
    if not isinstance(segm, (list, dict)):
        raise MfdetrError(f"{where} needs a 'segmentation' (polygons or RLE) for mask AP")
    im = imgs.get(a["image_id"])
    if isinstance(segm, dict) and im is not None:
        if "counts" not in segm or [int(v) for v in segm.get("size", [])] != [im["height"], im["width"]]:
            raise MfdetrError(
                f"{where}: an RLE needs 'counts' and the image's size [{im['height']}, {im['width']}]"
            )


def _check_fields(data: Any, path: Path) -> None:
    """The structure COCOeval and the degenerate rule rely on, else one error naming the entry."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise MfdetrError(f"annotation file {path} is not a COCO annotation file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise MfdetrError(f"annotation file {path}: '{key}' must be a list")
    for im in data["images"]:
        if not isinstance(im, dict) or not all(isinstance(im.get(k), int) for k in ("id", "height", "width")):
            raise MfdetrError(f"annotation file {path}: image {im!r:.80} needs integer id, height and width")
    imgs = {im["id"]: im for im in data["images"]}
    for a in data.get("annotations", []):
        _check_annotation(a, imgs, path)


def _box_region(ann: dict[str, Any]) -> list[list[float]] | None:
    x, y, bw, bh = (float(v) for v in ann["bbox"])
    if not (bw > 0 and bh > 0):
        return None
    return [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]


def repair_annotations(data: dict[str, Any]) -> list[tuple[int, str]]:
    """Apply the shared degenerate rule (:mod:`mfdetr.data.annotations`) to ``data`` in place: each
    degenerate annotation becomes an ignored box region (dropped when its box is empty too); polygon
    parts of fewer than 3 points are dropped from the others, as the training targets' rasterizer does.
    Returns ``[(annotation id, reason)]`` of the degenerate ones."""
    imgs = {int(im["id"]): im for im in data["images"]}
    anns = [a for a in data.get("annotations", []) if int(a["image_id"]) in imgs]  # COCOeval sees no other
    found = find_degenerate(anns, imgs)
    bad = {aid for aid, _ in found}
    kept = []
    for a in anns:
        if int(a["id"]) in bad:
            region = _box_region(a)
            if region is not None:
                kept.append({**a, "segmentation": region, "area": IGNORED_AREA, "degenerate": True})
            continue
        if isinstance(a["segmentation"], list):
            a["segmentation"] = [p for p in a["segmentation"] if isinstance(p, list) and len(p) >= 6]
        kept.append(a)
    data["annotations"] = kept
    return found


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read and check a COCO annotation file; degenerate annotations become ignored regions (listed in
    ``GroundTruth.degenerate``: the caller warns)."""
    path = Path(path)
    data = read_json(path)
    _check_fields(data, path)
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    data.setdefault("info", {})
    for a in data["annotations"]:
        a.setdefault("iscrowd", 0)
    found = repair_annotations(data)
    return GroundTruth(data, path, found)


def _pixel_box(bbox: list[float], h: int, w: int) -> tuple[int, int, int, int]:
    """The pixels a COCO ``[x, y, w, h]`` box touches: columns floor(x) .. ceil(x + w), clipped."""
    x, y, bw, bh = (float(v) for v in bbox)
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(w, math.ceil(x + bw)), min(h, math.ceil(y + bh))
    return x0, y0, max(x0, x1), max(y0, y1)


def occlusion_coverage(anns: list[dict[str, Any]], h: int, w: int) -> list[float]:
    """Per annotation of one image: the fraction of its box's pixels covered by the union of the
    *other* annotations' masks (any category, crowd included; ignored degenerate regions excluded)."""
    masks = [
        None if a.get("degenerate") else mask_util.decode(ann_to_rle(a["segmentation"], h, w)) for a in anns
    ]
    count = np.zeros((h, w), np.int32)
    for m in masks:
        if m is not None:
            count += m
    out = []
    for a, m in zip(anns, masks):
        x0, y0, x1, y1 = _pixel_box(a["bbox"], h, w) if a.get("bbox") else (0, 0, 0, 0)
        n = (x1 - x0) * (y1 - y0)
        if n == 0:
            out.append(0.0)
            continue
        others = count[y0:y1, x0:x1] - (m[y0:y1, x0:x1] if m is not None else 0)
        out.append(float((others > 0).sum()) / n)
    return out


def occluded_ground_truth(gt: GroundTruth, threshold: float = OCCLUSION_THRESHOLD) -> tuple[GroundTruth, int]:
    """``gt`` where only the non-crowd instances whose box is at least ``threshold`` covered by other
    instances' masks are evaluated; every other annotation is ignored (``area = -1``). Returns it and
    the number of occluded instances."""
    by_img: dict[int, list[dict[str, Any]]] = {}
    for a in gt.dataset["annotations"]:
        by_img.setdefault(int(a["image_id"]), []).append(a)
    anns = []
    n = 0
    for iid, group in by_img.items():
        im = gt.imgs.get(iid)
        if im is None:
            continue
        cov = occlusion_coverage(group, int(im["height"]), int(im["width"]))
        for a, c in zip(group, cov):
            occluded = c >= threshold and not a.get("iscrowd", 0) and not a.get("degenerate")
            n += int(occluded)
            anns.append(dict(a) if occluded else {**a, "area": IGNORED_AREA})
    return GroundTruth({**gt.dataset, "annotations": anns}, gt.path, list(gt.degenerate)), n
