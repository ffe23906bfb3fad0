"""COCO results: RLE encoding from box crops and the per-image worker jobs that build the result dicts.

- :func:`encode_crops` RLE-encodes thresholded box crops as full-image COCO RLEs without ever
  building the ``[H, W]`` mask: a column strip ``[H, w_box]`` is run-length coded in numpy and the run
  list is handed to pycocotools for the compressed string (identical to ``mask.encode`` of the full mask).
- :func:`image_results` is the per-image job (paste when given probabilities, threshold, encode, build
  the COCO result dicts); :class:`ResultPool` runs those jobs in worker processes with a bounded number
  in flight, so only a few images' masks exist at any time.

COCOeval of these results lives in :mod:`mfdetr.evaluate.coco_eval`.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from mfdetr.evaluate.paste import Crop, paste_crops_np


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

    def __init__(
        self, workers: int = 2, max_pending: int | None = None, start_method: str | None = None
    ) -> None:
        self.workers = max(0, int(workers))
        self.max_pending = max_pending or max(2, 4 * self.workers)
        self._pending: collections.deque = collections.deque()
        self._pool = None
        if self.workers > 0:
            # The jobs are numpy + pycocotools only (no torch, no BLAS), so "fork" is safe and starts
            # instantly; unlike forkserver/spawn it does not re-run an unguarded user script's main module.
            methods = mp.get_all_start_methods()
            method = start_method or (
                "fork" if "fork" in methods else "forkserver" if "forkserver" in methods else "spawn"
            )
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

    def __enter__(self) -> ResultPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()
