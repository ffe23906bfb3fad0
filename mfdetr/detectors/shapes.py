"""The shipped ``shapes`` detector: where it lives, and a box-AP check of any detector on a COCO split.

The weights (``weights/shapes/``: a Hugging Face RT-DETR ``save_pretrained`` folder + ``train_meta.json``) are
made by ``tools/train_shapes_detector.py`` and loaded by ``build_detector("shapes")`` through the ``hf:`` adapter.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from mfdetr.detectors.registry import SHAPES_DIR, shapes_available  # noqa: F401  (re-exported)
from mfdetr.data.image_io import load_image
from mfdetr.errors import MfdetrError


def box_ap(
    detector,
    annotations: str | Path,
    images: str | Path,
    limit: int | None = None,
    batch: int = 16,
) -> dict[str, Any]:
    """COCO box AP (pycocotools) of ``detector`` on a COCO split (first ``limit`` images by id).

    The detector must have been built with this split's ``categories`` so its labels are the split's ids.
    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "images", "detections"}``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, images = Path(annotations), Path(images)
    data = json.loads(annotations.read_text())
    data.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
    ids = sorted(gt.getImgIds())
    if limit is not None:
        ids = ids[:limit]
    if not ids:
        raise MfdetrError(f"{annotations}: no images to evaluate")
    dets: list[dict[str, Any]] = []
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch]
        ims = [load_image(images / gt.imgs[i]["file_name"]) for i in chunk]
        for iid, out in zip(chunk, detector.detect(ims)):
            b = out.boxes.cpu()
            for k in range(b.shape[0]):
                x1, y1, x2, y2 = (float(v) for v in b[k])
                dets.append({"image_id": iid, "category_id": int(out.labels[k]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": float(out.scores[k])})
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if not dets:
        return {**{k: 0.0 for k in keys}, "images": len(ids), "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {**{k: round(float(v), 4) for k, v in zip(keys, ev.stats[:6])}, "images": len(ids), "detections": len(dets)}
