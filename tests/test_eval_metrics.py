"""The metrics of ``evaluate`` beyond COCO's own: faster-coco-eval vs pycocotools parity, Boundary AP vs an
independent numpy implementation of the reference boundary formula, the occluded-instance subset, and
degenerate / invalid ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from mfdetr.errors import MfdetrError
from mfdetr.evaluate.coco_eval import evaluate_results, run_cocoeval
from mfdetr.evaluate.gt import GroundTruth, load_ground_truth, occlusion_coverage

IOU_THRS = np.linspace(0.5, 0.95, 10)


def rle(m: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def bbox_of(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def rect(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def ellipse(h, w, cx, cy, rx, ry) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def write_gt(
    path: Path, images: list[tuple[int, int, int]], gts: list[tuple[int, int, np.ndarray]], ncat: int = 3
) -> Path:
    anns = [
        {
            "id": k + 1,
            "image_id": iid,
            "category_id": cat,
            "segmentation": rle(m),
            "area": float(m.sum()),
            "bbox": bbox_of(m),
            "iscrowd": 0,
        }
        for k, (iid, cat, m) in enumerate(gts)
    ]
    data = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, h, w in images],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, ncat + 1)],
    }
    path.write_text(json.dumps(data))
    return path


def dets(items: list[tuple[int, int, np.ndarray, float]]) -> list[dict]:
    return [
        {"image_id": iid, "category_id": cat, "segmentation": rle(m), "bbox": bbox_of(m), "score": s}
        for iid, cat, m, s in items
    ]


# ------------------------------------------------------------------------------------ parity
def random_scene(seed: int = 0, n_img: int = 4):
    """Overlapping ellipses and rectangles; detections: jittered copies, duplicates and false positives."""
    rng = np.random.default_rng(seed)
    images, gts, res = [], [], []
    for iid in range(1, n_img + 1):
        h, w = int(rng.integers(48, 80)), int(rng.integers(48, 80))
        images.append((iid, h, w))
        for _ in range(int(rng.integers(3, 7))):
            cat = int(rng.integers(1, 4))
            cx, cy = rng.uniform(8, w - 8), rng.uniform(8, h - 8)
            rx, ry = rng.uniform(4, 18), rng.uniform(4, 18)
            kind = rng.random() < 0.5
            g = (
                ellipse(h, w, cx, cy, rx, ry)
                if kind
                else rect(h, w, int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry))
            )
            if not g.any():
                continue
            gts.append((iid, cat, g))
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections of it (duplicates are FPs)
                jx, jy, jr = rng.normal(0, 2), rng.normal(0, 2), rng.uniform(0.8, 1.25)
                d = ellipse(h, w, cx + jx, cy + jy, rx * jr, ry * jr)
                if d.any():
                    res.append(
                        (iid, cat if rng.random() < 0.9 else int(rng.integers(1, 4)), d, float(rng.random()))
                    )
        for _ in range(2):  # false positives
            d = rect(h, w, *sorted(rng.integers(0, w, 2)), *sorted(rng.integers(0, h, 2)))
            d = (
                rect(h, w, int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10)), w, h)
                if not d.any()
                else d
            )
            res.append((iid, int(rng.integers(1, 4)), d, float(rng.random())))
    return images, gts, dets(res)


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_and_pycocotools_agree(tmp_path, seed):
    images, gts, res = random_scene(seed)
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", images, gts))
    ids = [i for i, _, _ in images]
    bbox = [{k: v for k, v in r.items() if k != "segmentation"} for r in res]
    a = evaluate_results(gt, res, bbox, ids, per_category=True, evaluator="faster", threads=2)
    b = evaluate_results(gt, res, bbox, ids, per_category=True, evaluator="pycocotools")
    for name in ("segm", "bbox", "occluded"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert list(sa.stats.values()) == pytest.approx(list(sb.stats.values()), abs=1e-4), name
    assert a.segm.per_category == pytest.approx(b.segm.per_category, abs=1e-4)
    assert 0.05 < a.segm.stats["AP"] < 0.95  # a case where matching matters
    assert a.num_occluded == b.num_occluded > 0
    assert a.boundary is not None and b.boundary is None
    assert a.boundary.stats["AP"] <= a.segm.stats["AP"] + 1e-9  # min(mask IoU, boundary IoU) <= mask IoU


# ---------------------------------------------------------------------------------- boundary
def ref_boundary(mask: np.ndarray, ratio: float = 0.02) -> np.ndarray:
    """Reference ``mask_to_boundary`` (boundary-iou-api) without cv2: erode ``d`` times with a 3x3 square,
    the image border counting as background, and keep the mask minus its erosion."""
    h, w = mask.shape
    d = max(1, int(round(ratio * np.sqrt(h * h + w * w))))
    er = mask.astype(bool)
    for _ in range(d):
        p = np.pad(er, 1, constant_values=False)
        er = np.ones_like(er)
        for dy in range(3):
            for dx in range(3):
                er &= p[dy : dy + h, dx : dx + w]
    return mask.astype(bool) & ~er


def ref_boundary_iou(dt: np.ndarray, gt: np.ndarray) -> float:
    iou = (dt & gt).sum() / (dt | gt).sum()
    bd, bg = ref_boundary(dt), ref_boundary(gt)
    return float(min(iou, (bd & bg).sum() / (bd | bg).sum()))


def test_boundary_iou_and_ap_equal_the_reference_formula(tmp_path):
    """Three GT/detection pairs (one category each, so every pair is matched or not on its own) on a
    64 x 80 image (band width round(0.02 * 102.4) = 2 px); one mask touches the image border."""
    h, w = 64, 80
    L = rect(h, w, 40, 30, 70, 60) & ~rect(h, w, 52, 30, 70, 48)
    pairs = [
        (ellipse(h, w, 20, 20, 12, 9), ellipse(h, w, 21, 20.5, 12, 9.5)),
        (rect(h, w, 0, 40, 20, 64), rect(h, w, 1, 42, 22, 64)),  # touches the left and bottom borders
        (L, L & ~rect(h, w, 40, 54, 46, 60)),
    ]
    gt = load_ground_truth(
        write_gt(tmp_path / "gt.json", [(1, h, w)], [(1, c + 1, g) for c, (g, _) in enumerate(pairs)])
    )
    res = dets([(1, c + 1, d, 0.9) for c, (_, d) in enumerate(pairs)])
    ref = [ref_boundary_iou(d, g) for g, d in pairs]
    mask_iou = [float((d & g).sum() / (d | g).sum()) for g, d in pairs]
    assert all(r < m - 0.02 for r, m in zip(ref, mask_iou))  # the boundary term is what decides

    from faster_coco_eval import COCO, COCOeval_faster

    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt.dataset))
    coco.createIndex()
    ev = COCOeval_faster(
        coco,
        coco.loadRes([dict(r) for r in res]),
        "boundary",
        print_function=lambda *a: None,
        boundary_dilation_ratio=0.02,
    )
    ev.evaluate()
    got = [float(np.asarray(ev.ious[(1, c + 1)])[0, 0]) for c in range(3)]
    assert got == pytest.approx(ref, abs=1e-6)

    ours = run_cocoeval(gt, res, "boundary", [1])
    expected_ap = np.mean([[u >= t for t in IOU_THRS] for u in ref])  # one GT, one detection per category
    assert ours.stats["AP"] == pytest.approx(expected_ap, abs=1e-9)
    assert ours.stats["AP"] < run_cocoeval(gt, res, "segm", [1]).stats["AP"]


def test_boundary_needs_faster(tmp_path):
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", [(1, 20, 20)], [(1, 1, rect(20, 20, 2, 2, 9, 9))]))
    with pytest.raises(MfdetrError, match="faster"):
        run_cocoeval(gt, dets([(1, 1, rect(20, 20, 2, 2, 9, 9), 0.5)]), "boundary", evaluator="pycocotools")


# ---------------------------------------------------------------------------------- occluded
H, W = 40, 60
A = rect(H, W, 0, 0, 30, 30)  # box 900 px; B covers 5 x 10 = 50 of it: 5.6 %, not occluded
B = rect(H, W, 25, 5, 35, 15)  # box 100 px; A covers 50 of it: 50 %, occluded
C = rect(H, W, 45, 20, 55, 30)  # alone


def test_occlusion_coverage_by_hand():
    anns = [{"segmentation": rle(m), "bbox": bbox_of(m)} for m in (A, B, C)]
    assert occlusion_coverage(anns, H, W) == pytest.approx([50 / 900, 0.5, 0.0])


@pytest.mark.parametrize("evaluator", ["faster", "pycocotools"])
def test_occluded_ap_evaluates_only_occluded_instances(tmp_path, evaluator):
    gt = load_ground_truth(
        write_gt(tmp_path / "gt.json", [(1, H, W)], [(1, 1, A), (1, 1, B), (1, 1, C)], ncat=1)
    )

    def occ(items):
        r = dets(items)
        m = evaluate_results(gt, r, r, [1], evaluator=evaluator)
        assert m.num_occluded == 1
        return m

    only_b = occ([(1, 1, B, 0.9)])
    assert only_b.occluded.stats["AP"] == pytest.approx(1.0)  # A and C missed, but they are ignored
    assert only_b.segm.stats["AP"] < 0.5  # ... in the occluded row only
    # a detection of a non-occluded instance is neither TP nor FP, whatever its score
    assert occ([(1, 1, C, 0.95), (1, 1, B, 0.9)]).occluded.stats["AP"] == pytest.approx(1.0)
    # a false positive above it halves the precision at full recall
    fp = rect(H, W, 40, 0, 60, 10)
    assert occ([(1, 1, fp, 0.99), (1, 1, C, 0.95), (1, 1, B, 0.9)]).occluded.stats["AP"] == pytest.approx(
        0.5, abs=1e-2
    )


def test_no_occluded_instance_gives_none(tmp_path):
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", [(1, H, W)], [(1, 1, A), (1, 1, C)], ncat=1))
    r = dets([(1, 1, A, 0.9)])
    m = evaluate_results(gt, r, r, [1])
    assert m.occluded is None and m.num_occluded == 0


# ---------------------------------------------------------------------------- bad ground truth
def _with_degenerate(tmp_path: Path) -> Path:
    path = write_gt(tmp_path / "gt.json", [(1, H, W)], [(1, 1, A), (1, 1, C)], ncat=1)
    data = json.loads(path.read_text())
    data["annotations"] += [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [[40, 2, 58, 12]],
            "area": 20.0,
            "bbox": [40, 2, 18, 10],
            "iscrowd": 0,
        },  # a 2-point polygon
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [],
            "area": 0.0,
            "bbox": [2, 32, 20, 6],
            "iscrowd": 0,
        },  # empty
    ]
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("evaluator", ["faster", "pycocotools"])
def test_degenerate_annotations_are_ignored_regions(tmp_path, evaluator):
    gt = load_ground_truth(_with_degenerate(tmp_path))
    assert [aid for aid, _ in gt.degenerate] == [10, 11]
    assert "fewer than 3 points" in gt.degenerate[0][1] and "empty" in gt.degenerate[1][1]
    base = [(1, 1, A, 0.9), (1, 1, C, 0.8)]
    on_degenerate = [(1, 1, rect(H, W, 40, 2, 58, 12), 0.95), (1, 1, rect(H, W, 2, 32, 22, 38), 0.85)]
    a = evaluate_results(gt, dets(base), dets(base), [1], evaluator=evaluator)
    b = evaluate_results(gt, dets(base + on_degenerate), dets(base + on_degenerate), [1], evaluator=evaluator)
    assert a.segm.stats["AP"] == pytest.approx(1.0)  # the degenerate GTs are no misses
    assert b.segm.stats["AP"] == pytest.approx(1.0) and b.bbox.stats["AP"] == pytest.approx(1.0)  # nor FPs


def test_invalid_json_names_file_line_and_column(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"images": [],\n "annotations": [\n  {"id": 1,, }\n]}')
    with pytest.raises(MfdetrError) as e:
        load_ground_truth(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "column 12" in msg


def test_not_a_coco_file(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    with pytest.raises(MfdetrError, match="not a COCO annotation file"):
        load_ground_truth(p)
    with pytest.raises(MfdetrError, match="does not exist"):
        load_ground_truth(tmp_path / "missing.json")


def test_ground_truth_object_without_file():
    gt = GroundTruth({"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [], "categories": []})
    assert gt.name == "the annotation file" and set(gt.imgs) == {1}
