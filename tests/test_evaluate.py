"""``evaluate``: results JSON, COCOeval summary vs an independent pycocotools run, crowd / empty images,
mask scoring, workers, overlays, checkpoint/cache checks, and (when the cache and trainer exist) the
whole path over a real cache."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from mfdetr.cache.batch import collate_records
from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.evaluate.coco_eval import run_cocoeval
from mfdetr.evaluate.config import EvalConfig
from mfdetr.evaluate.evaluation import evaluate_batches
from mfdetr.evaluate.gt import load_ground_truth
from mfdetr.evaluate.meta import check_compatible

LEVELS = [LevelSpec("p8", 8, 4)]
M = 28
K = 6
D = 4


class OracleMaskNet(nn.Module):
    """Fake mask network with the MaskNet forward contract: the query says the shape.

    queries[..., 0]: 0 = ellipse inscribed in the box, 1 = the whole box; queries[..., 1]: iou_pred.
    """

    def forward(self, batch, select=None):
        sel = batch["valid"] if select is None else select
        rows = torch.nonzero(sel)
        q = batch["queries"][rows[:, 0], rows[:, 1]]
        c = (torch.arange(M, dtype=torch.float32) + 0.5) / M * 2 - 1
        r2 = c[None, :] ** 2 + c[:, None] ** 2
        ellipse = 20 * (1 - r2)
        logits = torch.where(q[:, 0, None, None] > 0.5, torch.full((M, M), 20.0), ellipse)
        return {"mask_logits": logits, "iou_pred": q[:, 1].clone(), "rows": rows}


def shape_mask(kind: str, box, height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    if kind == "rect":
        return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def rle_str(m: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


# (image id, (h, w), [(kind, box, cat, iscrowd)], [(kind, box, cat, det score, iou_pred)])
SCENE = [
    (
        1,
        (40, 60),
        [("ellipse", (5, 4, 35, 30), 1, 0), ("rect", (38, 10, 58, 36), 2, 0)],
        [
            ("ellipse", (5.4, 4.2, 35.3, 29.6), 1, 0.9, 0.8),
            ("rect", (38, 10.5, 57.5, 36), 2, 0.8, 0.9),
            ("rect", (0, 0, 12, 12), 2, 0.3, 0.2),
        ],
    ),
    (
        2,
        (48, 64),
        [("ellipse", (10, 8, 40, 40), 2, 0), ("rect", (44, 2, 62, 20), 1, 1)],
        [("ellipse", (9.7, 8.3, 40.2, 39.8), 2, 0.95, 0.95), ("rect", (44.5, 2.5, 61.5, 19.5), 1, 0.7, 0.9)],
    ),
    (3, (30, 30), [], [("rect", (3, 3, 20, 20), 1, 0.6, 0.5)]),  # no GT: all false positives
    (4, (50, 45), [("rect", (5, 5, 30, 40), 1, 0)], []),  # GT, no detection
    (
        5,
        (45, 70),
        [("ellipse", (-3, 20, 25, 47), 1, 0), ("rect", (50, -2, 72, 30), 2, 0)],  # cross borders
        [
            ("ellipse", (0, 20, 25, 45), 1, 0.85, 0.9),
            ("rect", (50, 0, 70, 30), 2, 0.75, 0.7),
            ("ellipse", (30, 5, 48, 25), 1, 0.5, 0.4),
            ("rect", (5, 5, 15, 15), 2, 0.2, 0.9),
        ],
    ),
]


def write_scene(root: Path, scene=SCENE) -> Path:
    images, anns = [], []
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for iid, (h, w), gts, _ in scene:
        name = f"img{iid}.png"
        pix = np.full((h, w, 3), 40, np.uint8)
        for kind, box, cat, _crowd in gts:
            pix[shape_mask(kind, box, h, w)] = (200, 60 * cat, 90)
        Image.fromarray(pix).save(img_dir / name)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        for kind, box, cat, crowd in gts:
            m = shape_mask(kind, box, h, w)
            ys, xs = np.nonzero(m)
            bbox = [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": iid,
                    "category_id": cat,
                    "segmentation": rle_str(m),
                    "area": float(m.sum()),
                    "bbox": bbox,
                    "iscrowd": crowd,
                }
            )
    cats = [{"id": 1, "name": "ellipse-ish"}, {"id": 2, "name": "box-ish"}]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def scene_records(scene=SCENE):
    recs = []
    for i, (iid, (h, w), _, dets) in enumerate(scene):
        boxes = torch.zeros(K, 4)
        scores = torch.zeros(K)
        labels = torch.full((K,), -1, dtype=torch.int64)
        queries = torch.zeros(K, D)
        for k, (kind, box, cat, s, iou) in enumerate(dets):
            boxes[k] = torch.tensor(box)
            scores[k] = s
            labels[k] = cat
            queries[k, 0] = float(kind == "rect")
            queries[k, 1] = iou
        recs.append(
            {
                "index": i,
                "image_id": iid,
                "orig_size": (h, w),
                "input_size": (h, w),
                "scale": (1.0, 1.0),
                "num_boxes": len(dets),
                "boxes": boxes,
                "scores": scores,
                "labels": labels,
                "queries": queries,
                "features": {"p8": torch.zeros(4, (h + 7) // 8, (w + 7) // 8)},
            }
        )
    return recs


def scene_batches(batch_size=2, scene=SCENE):
    recs = scene_records(scene)
    return [collate_records(recs[i : i + batch_size], LEVELS) for i in range(0, len(recs), batch_size)]


def independent_cocoeval(ann_path: Path, results_path: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dt = gt.loadRes(str(results_path))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def run(tmp_path: Path, scene=SCENE, paste_on_device=None, **kw):
    ann = write_scene(tmp_path / "data", scene)
    gt = load_ground_truth(ann)
    cfg = EvalConfig(**{"workers": 0, "progress": False, **kw})
    res = evaluate_batches(
        OracleMaskNet(),
        scene_batches(scene=scene),
        gt,
        tmp_path / "out",
        cfg,
        images_root=str(tmp_path / "data" / "images"),
        paste_on_device=paste_on_device,
    )
    return ann, res


def test_summary_equals_independent_pycocotools(tmp_path):
    ann, res = run(tmp_path, per_category=True, evaluator="pycocotools")
    out = tmp_path / "out"
    for iou_type, fname in (("segm", "results_segm.json"), ("bbox", "results_bbox.json")):
        ref = independent_cocoeval(ann, out / fname, iou_type)
        ours = list(getattr(res.metrics, iou_type).stats.values())
        assert ours == pytest.approx(ref, abs=1e-12), iou_type
    saved = json.loads((out / "summary.json").read_text())
    assert saved["segm"]["AP"] == res.mask_ap == res.metrics.segm.stats["AP"]
    assert set(res.metrics.segm.per_category) == {1, 2}
    # the oracle masks are near perfect: mask AP is close to the box AP (misses and FPs cap both)
    assert res.mask_ap >= 0.85 * res.box_ap > 0.5
    assert res.num_images == 5
    table = res.table()
    assert "mask" in table and "box" in table and "ellipse-ish" in table


def test_results_format_and_mask_scoring(tmp_path):
    _, _ = run(tmp_path, topk=2)
    res = json.loads((tmp_path / "out" / "results_segm.json").read_text())
    boxes = json.loads((tmp_path / "out" / "results_bbox.json").read_text())
    by_img = {}
    for r in res:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert isinstance(r["segmentation"]["counts"], str)
        by_img.setdefault(r["image_id"], []).append(r)
    assert all(len(v) <= 2 for v in by_img.values())  # topk per image
    assert 4 not in by_img  # no detections on image 4
    # image 5: final = det x iou: 0.85*0.9=.765, 0.75*.7=.525, .5*.4=.2, .2*.9=.18 -> the first two
    assert [round(r["score"], 4) for r in by_img[5]] == [0.765, 0.525]
    # box results keep the detector's scores and order
    assert [b["score"] for b in boxes if b["image_id"] == 5] == pytest.approx([0.85, 0.75])
    (tmp_path / "b").mkdir()
    _, _ = run(tmp_path / "b", mask_score=False)
    res2 = json.loads((tmp_path / "b" / "out" / "results_segm.json").read_text())
    assert [round(r["score"], 4) for r in res2 if r["image_id"] == 5] == [0.85, 0.75, 0.5, 0.2]


def test_masks_equal_dense_reference(tmp_path):
    """Each result's RLE decodes to detectron2's full-image paste (grid_sample) thresholded at 0.5."""
    import torch.nn.functional as F

    _, _ = run(tmp_path, mask_score=False)
    res = json.loads((tmp_path / "out" / "results_segm.json").read_text())
    net = OracleMaskNet()
    recs = {r["image_id"]: r for r in scene_records()}
    for r in res:
        rec = recs[r["image_id"]]
        k = [round(float(s), 6) for s in rec["scores"]].index(round(r["score"], 6))
        b = collate_records([rec], LEVELS)
        out = net(b)
        prob = torch.sigmoid(out["mask_logits"][k]).double()
        h, w = rec["orig_size"]
        x0, y0, x1, y1 = rec["boxes"][k].double().tolist()
        gy = (torch.arange(h, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
        gx = (torch.arange(w, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack([gx[None].expand(h, w), gy[:, None].expand(h, w)], -1)[None]
        ref = F.grid_sample(prob[None, None], grid, align_corners=False)[0, 0].numpy() >= 0.5
        got = mask_util.decode(
            {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        )
        assert (got.astype(bool) == ref).all()


def test_workers_give_identical_results(tmp_path):
    run(tmp_path / "a", workers=0)
    run(tmp_path / "b", workers=2)
    a = (tmp_path / "a" / "out" / "results_segm.json").read_text()
    b = (tmp_path / "b" / "out" / "results_segm.json").read_text()
    assert a == b


def test_device_paste_path_gives_identical_results(tmp_path):
    """The chunked torch paste (the GPU path, run here on CPU tensors) + encode in workers equals the
    per-box numpy paste in workers."""
    run(tmp_path / "a", workers=0)
    run(tmp_path / "b", workers=2, paste_on_device=True)
    a = (tmp_path / "a" / "out" / "results_segm.json").read_text()
    b = (tmp_path / "b" / "out" / "results_segm.json").read_text()
    assert a == b


def test_crowd_detections_are_ignored(tmp_path):
    """A detection on a crowd region is neither TP nor FP: removing it leaves AP unchanged."""
    scene = [s for s in SCENE if s[0] == 2]
    _, with_crowd_det = run(tmp_path / "a", scene=scene)
    scene_wo = [(iid, hw, gts, dets[:1]) for iid, hw, gts, dets in scene]
    _, without = run(tmp_path / "b", scene=scene_wo)
    assert with_crowd_det.mask_ap == pytest.approx(without.mask_ap)
    assert with_crowd_det.mask_ap > 0.9


def test_no_detections_anywhere(tmp_path):
    scene = [(iid, hw, gts, []) for iid, hw, gts, _ in SCENE]
    _, res = run(tmp_path, scene=scene, per_category=True)
    assert res.num_detections == 0
    assert res.mask_ap == 0.0 and res.box_ap == 0.0
    assert json.loads((tmp_path / "out" / "results_segm.json").read_text()) == []


def test_no_gt_images_only(tmp_path):
    ann = write_scene(tmp_path, [s for s in SCENE if s[0] == 3])
    gt = load_ground_truth(ann)
    res = run_cocoeval(gt, [], "segm", [3])
    assert res.stats["AP"] == -1.0


def test_vis_overlays(tmp_path):
    _, res = run(tmp_path, vis=2)
    files = res.files["vis"]
    assert len(files) == 2
    with Image.open(files[0]) as im:
        assert im.size == (60, 40)  # image 1 is 40 x 60 (h, w)
        arr = np.asarray(im.convert("RGB"))
    assert (arr != 40).any()  # something was drawn


def test_unknown_image_id_is_a_clear_error(tmp_path):
    ann = write_scene(tmp_path / "data", SCENE[:2])
    gt = load_ground_truth(ann)
    with pytest.raises(MfdetrError, match="not in"):
        evaluate_batches(
            OracleMaskNet(), scene_batches(), gt, tmp_path / "out", EvalConfig(workers=0, progress=False)
        )


def test_checkpoint_cache_mismatch():
    attrs = {
        "detector": {
            "spec": "a",
            "fingerprint": "f" * 64,
            "levels": [{"name": "p8", "stride": 8, "channels": 4}],
        }
    }
    lv8, lv16 = [LevelSpec("p8", 8, 4)], [LevelSpec("p16", 16, 4)]

    def meta(spec, fp, levels):  # what a checkpoint records (mfdetr.model.checkpoint)
        return {"detector": {"spec": spec, "fingerprint": fp, "levels": levels}, "levels": levels}

    check_compatible(meta("a", "f" * 64, lv8), attrs, "c", Path("k"))
    with pytest.raises(MfdetrError, match="fingerprint"):
        check_compatible(meta("b", "e" * 64, lv8), attrs, "c", Path("k"))
    with pytest.raises(MfdetrError, match="level"):
        check_compatible(meta("a", "f" * 64, lv16), attrs, "c", Path("k"))


def test_faster_evaluator_equals_pycocotools_on_our_results(tmp_path):
    """The default evaluator (faster-coco-eval) gives pycocotools' segm and bbox stats on our results."""
    _, fast = run(tmp_path / "a", per_category=True)
    _, ref = run(tmp_path / "b", per_category=True, evaluator="pycocotools")
    assert fast.metrics.evaluator == "faster" and ref.metrics.evaluator == "pycocotools"
    for name in ("segm", "bbox"):
        a, b = getattr(fast.metrics, name), getattr(ref.metrics, name)
        assert a.stats == pytest.approx(b.stats, abs=1e-4), name
        assert a.per_category == pytest.approx(b.per_category, abs=1e-4), name
    assert 0.5 < fast.mask_ap < 0.95
    assert fast.boundary_ap is not None and fast.boundary_ap <= fast.mask_ap


@pytest.mark.parametrize("evaluator", ["faster", "pycocotools"])
def test_topk_below_100_gives_a_real_ap(tmp_path, evaluator):
    """pycocotools' summarize reads AP at maxDets == 100 only: a top-k of 2 used to report AP = -1."""
    ann, res = run(tmp_path, topk=2, evaluator=evaluator)
    ref = independent_cocoeval(
        ann, tmp_path / "out" / "results_segm.json", "segm"
    )  # maxDets 100, <= 2 per image
    assert res.mask_ap is not None
    assert res.metrics.segm.stats["AP"] == pytest.approx(ref[0], abs=1e-4)
