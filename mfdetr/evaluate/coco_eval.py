"""COCO evaluation, the one owner: COCOeval of result lists against a :class:`GroundTruth`, the AP table,
and the box AP of a live detector on a COCO split (``tools/``).

Two evaluators give the same segm and bbox AP: ``faster`` (faster-coco-eval, the default; C++ matching
and accumulation, and the only one with ``boundary``: Boundary AP of Cheng et al. 2021, IoU =
min(mask IoU, IoU of the inner boundary bands of width 2% of the image diagonal)) and ``pycocotools``.
:func:`evaluate_results` runs everything ``mfdetr evaluate`` reports: mask, box, boundary and
occluded-instance AP (:mod:`mfdetr.evaluate.gt` defines the occluded subset).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mfdetr.errors import MfdetrError
from mfdetr.evaluate.config import EVALUATORS
from mfdetr.evaluate.gt import GroundTruth, load_ground_truth, occluded_ground_truth

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
TABLE_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
BOUNDARY_DILATION_RATIO = 0.02
Evaluator = Literal["faster", "pycocotools"]


@dataclass
class CocoStats:
    """One COCOeval: COCO's 12 stats (fractions in [0, 1]; -1 where undefined, e.g. no GT)."""

    stats: dict[str, float]
    num_detections: int
    per_category: dict[int, float] | None = None

    @property
    def ap(self) -> float | None:
        v = self.stats["AP"]
        return None if v < 0 else v


@dataclass
class EvalMetrics:
    """Everything ``evaluate`` reports; ``boundary`` is None with the pycocotools evaluator (or when not
    asked for) and ``occluded`` None when no ground-truth instance is occluded."""

    segm: CocoStats
    bbox: CocoStats
    boundary: CocoStats | None
    occluded: CocoStats | None
    num_occluded: int
    evaluator: str
    degenerate: list[int] = field(default_factory=list)


def _backend(evaluator: str):
    if evaluator == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if evaluator == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise MfdetrError(f"--evaluator {evaluator!r}: choose one of {list(EVALUATORS)}")


def _gt_coco(gt: GroundTruth, coco_cls):
    data = {**gt.dataset, "annotations": [dict(a) for a in gt.dataset["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_cls()
        coco.dataset = data
        coco.createIndex()
    return coco


def _empty_stats(gt: GroundTruth, img_ids: Sequence[int], per_category: bool) -> CocoStats:
    """No detections: AP 0 where there is (non-ignored) GT, -1 where there is none."""
    ids = set(img_ids)
    live = [
        a
        for a in gt.dataset["annotations"]
        if int(a["image_id"]) in ids and not a.get("iscrowd", 0) and a.get("area", 1) >= 0
    ]
    fill = 0.0 if live else -1.0
    pc = None
    if per_category:
        cats = {int(a["category_id"]) for a in live}
        pc = {int(c["id"]): (0.0 if int(c["id"]) in cats else -1.0) for c in gt.categories()}
    return CocoStats({k: fill for k in STAT_NAMES}, 0, pc)


def _per_category(ev) -> dict[int, float]:
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        out[int(cat_id)] = float(p.mean()) if p.size else -1.0
    return out


def run_cocoeval(
    gt: GroundTruth,
    results: Sequence[dict[str, Any]],
    iou_type: str,
    img_ids: Sequence[int] | None = None,
    max_dets: int = 100,
    per_category: bool = False,
    evaluator: Evaluator = "faster",
    threads: int = 1,
) -> CocoStats:
    """COCOeval ``iou_type`` ("segm", "bbox" or, with faster, "boundary") of ``results`` on ``img_ids``.

    Crowd GT is kept (detections matched to it are ignored), as are ``area < 0`` regions. ``threads``:
    faster-coco-eval's IoU / boundary threads (the result does not depend on it).
    """
    if iou_type == "boundary" and evaluator != "faster":
        raise MfdetrError("Boundary AP needs the faster evaluator (--evaluator faster)")
    img_ids = sorted(int(i) for i in (img_ids if img_ids is not None else gt.imgs))
    if not results:
        return _empty_stats(gt, img_ids, per_category)
    coco_cls, eval_cls = _backend(evaluator)
    gt_coco = _gt_coco(gt, coco_cls)
    dets = [dict(r) for r in results]  # loadRes adds area, id, ... to its input
    if iou_type == "bbox":
        for d in dets:
            d.pop("segmentation", None)
    kw: dict[str, Any] = {}
    if evaluator == "faster":
        t = max(1, int(threads))
        kw = dict(
            print_function=lambda *a, **k: None,
            boundary_dilation_ratio=BOUNDARY_DILATION_RATIO,
            boundary_cpu_count=t,
            rle_iou_max_workers=t,
        )
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = eval_cls(gt_coco, gt_coco.loadRes(dets), iou_type, **kw)
        ev.params.imgIds = img_ids
        ev.params.maxDets = [1, 10, max(int(max_dets), 10)]
        ev.evaluate()
        ev.accumulate()
        if evaluator == "pycocotools":
            # pycocotools' summarize looks AP up at maxDets == 100 (hard-coded), so any other top-k gave
            # AP = -1: relabel the last slot (accumulated at our top-k) as 100
            ev.params.maxDets = [1, 10, 100]
        ev.summarize()
    stats = {k: float(v) for k, v in zip(STAT_NAMES, np.asarray(ev.stats)[: len(STAT_NAMES)])}
    return CocoStats(stats, len(results), _per_category(ev) if per_category else None)


def evaluate_results(
    gt: GroundTruth,
    segm_results: Sequence[dict[str, Any]],
    bbox_results: Sequence[dict[str, Any]],
    img_ids: Sequence[int],
    max_dets: int = 100,
    per_category: bool = False,
    evaluator: Evaluator = "faster",
    threads: int = 1,
    boundary: bool = True,
) -> EvalMetrics:
    """Mask, box, Boundary (faster only, unless ``boundary`` is off) and occluded-instance mask AP."""
    kw = dict(img_ids=img_ids, max_dets=max_dets, evaluator=evaluator, threads=threads)
    segm = run_cocoeval(gt, segm_results, "segm", per_category=per_category, **kw)
    bbox = run_cocoeval(gt, bbox_results, "bbox", per_category=per_category, **kw)
    b_ap = run_cocoeval(gt, segm_results, "boundary", **kw) if boundary and evaluator == "faster" else None
    ids = set(int(i) for i in img_ids)
    sub = GroundTruth(
        {**gt.dataset, "annotations": [a for a in gt.dataset["annotations"] if int(a["image_id"]) in ids]},
        gt.path,
    )
    occ_gt, n_occ = occluded_ground_truth(sub)
    occluded = run_cocoeval(occ_gt, segm_results, "segm", **kw) if n_occ else None
    return EvalMetrics(segm, bbox, b_ap, occluded, n_occ, evaluator, [aid for aid, _ in gt.degenerate])


# ------------------------------------------------------------------------------------------- table
def _fmt(v: float | None) -> str:
    return "   -" if v is None or v < 0 else f"{100 * v:5.1f}"


def format_table(metrics: EvalMetrics, cat_names: dict[int, str] | None = None) -> str:
    """Text table: one row per metric (mask, box, boundary, occluded), AP columns in percent; then per
    category mask and box AP when they were computed."""
    lines = [f"{'':9s}" + "".join(f"{s:>7s}" for s in TABLE_STATS)]
    rows = (
        ("mask", metrics.segm),
        ("box", metrics.bbox),
        ("boundary", metrics.boundary),
        ("occluded", metrics.occluded),
    )
    for name, st in rows:
        if st is not None:
            lines.append(f"{name:9s}" + "".join(f"{_fmt(st.stats[s]):>7s}" for s in TABLE_STATS))
    if metrics.occluded is not None:
        lines.append(
            f"(occluded: mask AP over the {metrics.num_occluded} GT instances whose box is >= 10% "
            "covered by other instances' masks; APs/APm/APl of that row by the instance's area)"
        )
    pcs, pcb = metrics.segm.per_category, metrics.bbox.per_category
    if pcs or pcb:
        cat_ids = sorted(set(pcs or {}) | set(pcb or {}))
        width = max([8] + [len((cat_names or {}).get(c, str(c))) for c in cat_ids])
        lines += ["", f"{'category':{width}s} {'mask AP':>8s} {'box AP':>8s}"]
        for c in cat_ids:
            name = (cat_names or {}).get(c, str(c))
            lines.append(
                f"{name:{width}s} {_fmt((pcs or {}).get(c, -1.0)):>8s} {_fmt((pcb or {}).get(c, -1.0)):>8s}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- box AP of a detector
def detector_box_ap(
    detector,
    annotations: str | Path,
    images: str | Path,
    limit: int | None = None,
    batch: int = 16,
    evaluator: Evaluator = "faster",
) -> dict[str, Any]:
    """COCO box AP of a live ``detector`` on a COCO split (first ``limit`` images by id).

    The detector must have been built with this split's ``categories`` so its labels are the split's ids.
    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "images", "detections"}`` (AP rounded to 1e-4).
    """
    from mfdetr.data.image_io import load_image

    gt = load_ground_truth(annotations)
    ids = sorted(gt.imgs)[:limit] if limit is not None else sorted(gt.imgs)
    if not ids:
        raise MfdetrError(f"{annotations}: no images to evaluate")
    dets: list[dict[str, Any]] = []
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch]
        ims = [load_image(Path(images) / gt.imgs[i]["file_name"], what=f"image id {i}") for i in chunk]
        for iid, out in zip(chunk, detector.detect(ims)):
            b = out.boxes.cpu()
            for k in range(b.shape[0]):
                x1, y1, x2, y2 = (float(v) for v in b[k])
                dets.append(
                    {
                        "image_id": iid,
                        "category_id": int(out.labels[k]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(out.scores[k]),
                    }
                )
    st = run_cocoeval(gt, dets, "bbox", ids, evaluator=evaluator).stats
    return {**{k: round(st[k], 4) for k in TABLE_STATS}, "images": len(ids), "detections": len(dets)}
