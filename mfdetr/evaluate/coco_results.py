"""COCO results: RLE encoding from box crops, per-image worker jobs, COCOeval and its table.

- :func:`encode_crops` RLE-encodes thresholded box crops as full-image COCO RLEs without ever
  building the ``[H, W]`` mask: a column strip ``[H, w_box]`` is run-length coded in numpy and the run
  list is handed to pycocotools for the compressed string (identical to ``mask.encode`` of the full mask).
- :func:`image_results` is the per-image job (paste when given probabilities, threshold, encode, build
  the COCO result dicts); :class:`ResultPool` runs those jobs in worker processes with a bounded number
  in flight, so only a few images' masks exist at any time.
- :func:`run_cocoeval` / :func:`format_table` evaluate with pycocotools and print the AP table.
"""

from __future__ import annotations

import collections
import contextlib
import io
import multiprocessing as mp
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from pycocotools import mask as mask_util

from mfdetr.evaluate.paste import Crop, paste_crops_np

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
TABLE_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


# ----------------------------------------------------------------------------------------------- RLE
def crop_runs(crop: Crop, height: int, width: int) -> np.ndarray:
    """Uncompressed COCO run lengths (column-major, first run = zeros) of a crop in an H x W image."""
    h, w = crop.mask.shape
    total = height * width
    if h == 0 or w == 0 or not crop.mask.any():
        return np.array([total], dtype=np.int64)
    strip = np.zeros((w, height), dtype=np.uint8)  # the box's columns, full height, transposed
    strip[:, crop.y0 : crop.y0 + h] = crop.mask.T
    flat = strip.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    runs[0] += crop.x0 * height
    tail = (width - crop.x0 - w) * height
    if tail:
        if len(runs) % 2 == 1:  # last run is a zero run
            runs[-1] += tail
        else:
            runs = np.concatenate((runs, [tail]))
    return runs


def encode_crops(crops: Sequence[Crop], height: int, width: int) -> list[dict[str, Any]]:
    """COCO compressed RLEs ``{"size": [H, W], "counts": str}`` of thresholded crops."""
    if not crops:
        return []
    objs = [{"counts": crop_runs(c, height, width).tolist(), "size": [height, width]} for c in crops]
    rles = mask_util.frPyObjects(objs, height, width)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def encode_full(masks: np.ndarray) -> list[dict[str, Any]]:
    """pycocotools ``mask.encode`` of dense ``[N, H, W]`` bool masks, counts as str (reference path)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


# -------------------------------------------------------------------------------------------- jobs
def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def image_results(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One image: paste (``probs`` given) or take ``crops``, encode, and build COCO segm results.

    job: image_id, height, width, boxes [N,4] xyxy, labels [N], scores [N], and either
    ``probs [N,M,M]`` float32 (+ ``threshold``) or ``crops`` (list of :class:`Crop`); optional
    ``extra`` (list of N dicts merged into each result, e.g. ``file_name``).
    """
    h, w = int(job["height"]), int(job["width"])
    crops = job.get("crops")
    if crops is None:
        crops = paste_crops_np(job["probs"], job["boxes"], h, w, float(job.get("threshold", 0.5)))
    rles = encode_crops(crops, h, w)
    xywh = xyxy_to_xywh(job["boxes"])
    extra = job.get("extra")
    out = []
    for k, rle in enumerate(rles):
        r = {
            "image_id": int(job["image_id"]),
            "category_id": int(job["labels"][k]),
            "bbox": [round(float(v), 3) for v in xywh[k]],
            "score": float(job["scores"][k]),
            "segmentation": rle,
        }
        if extra is not None:
            r.update(extra[k])
        out.append(r)
    return out


class ResultPool:
    """Run :func:`image_results` jobs in ``workers`` processes (0 = in this process), in order.

    ``submit(job)`` may block on the oldest job when ``max_pending`` are in flight; finished results
    come out of ``submit``/``drain`` as ``(key, results)`` in submission order.
    """

    def __init__(self, workers: int = 2, max_pending: int | None = None, start_method: str | None = None) -> None:
        self.workers = max(0, int(workers))
        self.max_pending = max_pending or max(2, 4 * self.workers)
        self._pending: collections.deque = collections.deque()
        self._pool = None
        if self.workers > 0:
            # The jobs are numpy + pycocotools only (no torch, no BLAS), so "fork" is safe and starts
            # instantly; unlike forkserver/spawn it does not re-run an unguarded user script's main module.
            methods = mp.get_all_start_methods()
            method = start_method or ("fork" if "fork" in methods else "forkserver" if "forkserver" in methods else "spawn")
            self._pool = mp.get_context(method).Pool(self.workers)

    def submit(self, key: Any, job: dict[str, Any]) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
        if self._pool is None:
            yield key, image_results(job)
            return
        self._pending.append((key, self._pool.apply_async(image_results, (job,))))
        while len(self._pending) > self.max_pending:
            k, res = self._pending.popleft()
            yield k, res.get()

    def drain(self) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
        while self._pending:
            k, res = self._pending.popleft()
            yield k, res.get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "ResultPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()


# ---------------------------------------------------------------------------------------- COCOeval
def load_coco(annotations: str | Path):
    """pycocotools COCO of an annotation file, quietly."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotations))


def run_cocoeval(
    gt,
    results: str | Path | list[dict[str, Any]],
    iou_type: str,
    img_ids: Sequence[int] | None = None,
    max_dets: int = 100,
    per_category: bool = False,
) -> dict[str, Any]:
    """COCOeval ``iou_type`` ("segm" or "bbox") of ``results`` (a results JSON path or list) against ``gt``.

    Returns ``{"stats": {AP, AP50, ..., ARl}, "per_category": {cat_id: AP} (if asked),
    "num_detections": int}``. Stats are COCO's fractions in [0, 1] (-1 where undefined, e.g. no GT).
    Crowd GT is kept: COCOeval ignores detections matched to it. No detections -> all AP = 0
    (-1 where there is no GT either).
    """
    from pycocotools.cocoeval import COCOeval

    if isinstance(results, (str, Path)):
        import json

        with open(results) as f:
            results = json.load(f)
    results = list(results)
    img_ids = sorted(int(i) for i in (img_ids if img_ids is not None else gt.getImgIds()))
    if not results:
        has_gt = any(not a.get("iscrowd", 0) for a in gt.loadAnns(gt.getAnnIds(imgIds=img_ids)))
        fill = 0.0 if has_gt else -1.0
        out: dict[str, Any] = {"stats": {k: fill for k in STAT_NAMES}, "num_detections": 0}
        if per_category:
            out["per_category"] = {int(c): (0.0 if gt.getAnnIds(imgIds=img_ids, catIds=[c], iscrowd=False) else -1.0) for c in gt.getCatIds()}
        return out
    # loadRes mutates its input (adds area, id, ...): give it copies
    dets = [dict(r) for r in results]
    if iou_type == "bbox":
        for d in dets:
            d.pop("segmentation", None)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = gt.loadRes(dets)
        ev = COCOeval(gt, coco_dt, iou_type)
        ev.params.imgIds = img_ids
        ev.params.maxDets = [1, 10, max(int(max_dets), 10)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {"stats": {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}, "num_detections": len(results)}
    if per_category:
        prec = ev.eval["precision"]  # [T, R, K, A, M]
        pc = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            pc[int(cat_id)] = float(p.mean()) if p.size else -1.0
        out["per_category"] = pc
    return out


def _fmt(v: float) -> str:
    return "   -" if v < 0 else f"{100 * v:5.1f}"


def format_table(summary: dict[str, Any], cat_names: dict[int, str] | None = None) -> str:
    """Text table of a summary (``{"segm": stats, "bbox": stats, "per_category"?: {"segm": {cat: AP},
    "bbox": {...}}}``): one row per IoU type (mask, box), AP columns in percent; per category if present."""
    lines = []
    head = f"{'':6s}" + "".join(f"{s:>7s}" for s in TABLE_STATS)
    lines.append(head)
    for key, name in (("segm", "mask"), ("bbox", "box")):
        if key in summary:
            st = summary[key]
            lines.append(f"{name:6s}" + "".join(f"{_fmt(st[s]):>7s}" for s in TABLE_STATS))
    pcs = summary.get("per_category") or {}
    if any(v for v in pcs.values()):
        cat_ids = sorted({c for v in pcs.values() if v for c in v})
        width = max([8] + [len((cat_names or {}).get(c, str(c))) for c in cat_ids])
        lines.append("")
        lines.append(f"{'category':{width}s} {'mask AP':>8s} {'box AP':>8s}")
        for c in cat_ids:
            name = (cat_names or {}).get(c, str(c))
            m = (pcs.get("segm") or {}).get(c, -1.0)
            b = (pcs.get("bbox") or {}).get(c, -1.0)
            lines.append(f"{name:{width}s} {_fmt(m):>8s} {_fmt(b):>8s}")
    return "\n".join(lines)
