"""Degenerate annotations (``mfdetr.data.annotations``): the rule, checked against pycocotools itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mfdetr.data.annotations import degenerate_reason, describe_degenerate, find_degenerate
from mfdetr.data.coco import CocoDataset
from tests.coco_fixture import uncompressed_rle

H, W = 20, 30
SQUARE = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]


def ann(segm=None, bbox=(2.0, 2.0, 10.0, 10.0), **kw):
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": list(bbox), **kw}
    if segm is not None:
        a["segmentation"] = segm
    return a


def full_rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def test_good_annotations_pass():
    m = np.zeros((H, W), bool)
    m[3:6, 4:9] = True
    partly_outside = ann([SQUARE], bbox=(28.0, 18.0, 5.0, 5.0))
    with_short_part = ann([SQUARE, [1.0, 1.0, 2.0, 2.0]])  # the short part is dropped, the square kept
    rles = [ann(full_rle(m)), ann(uncompressed_rle(m))]
    for a in (ann([SQUARE]), with_short_part, *rles, ann(None), partly_outside):
        assert degenerate_reason(a, H, W) is None, a


@pytest.mark.parametrize(
    "a, why",
    [
        (ann([[1.0, 1.0, 9.0, 9.0]]), "polygon with fewer than 3 points (2 point(s))"),
        (ann([[1.0, 1.0]]), "polygon with fewer than 3 points (1 point(s))"),
        (ann([]), "empty segmentation"),
        (ann([[]]), "polygon with fewer than 3 points (0 point(s))"),
        (ann([SQUARE], bbox=(3.0, 3.0, 0.0, 4.0)), "zero-area box (width 0, height 4)"),
        (ann([SQUARE], bbox=(3.0, 3.0, 5.0, 0.0)), "zero-area box (width 5, height 0)"),
        (ann([SQUARE], bbox=(40.0, 3.0, 5.0, 5.0)), "lies outside the 30x20 image"),
        (ann(full_rle(np.zeros((H, W), bool))), "empty RLE mask"),
        (ann(uncompressed_rle(np.zeros((H, W), bool))), "empty RLE mask"),
    ],
)
def test_degenerate_cases(a, why):
    reason = degenerate_reason(a, H, W)
    assert reason is not None and why in reason


@pytest.mark.parametrize("segm", [[[1.0, 1.0, 9.0, 9.0]], [[1.0, 1.0]], [], [[]]])
def test_flagged_polygons_are_what_pycocotools_cannot_read(segm):
    """The independent reference: pycocotools fails on exactly these (the crash ``evaluate`` used to hit
    after all the inference), while a 3-point polygon reads fine."""
    assert degenerate_reason(ann(segm), H, W) is not None
    with pytest.raises(Exception, match="not supported|out of range|incorrect type"):
        mask_utils.frPyObjects(segm, H, W)
    assert mask_utils.area(mask_utils.frPyObjects([SQUARE[:6]], H, W))[0] > 0


def test_box_only_check_ignores_the_segmentation():
    assert degenerate_reason(ann([]), H, W, need_segm=False) is None
    assert degenerate_reason(ann([], bbox=(1, 1, 0, 1)), H, W, need_segm=False) is not None


def test_reader_drops_them_and_lists_them(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a.png")
    anns = [ann([SQUARE]), ann([[1.0, 1.0, 9.0, 9.0]]), ann([]), ann([SQUARE], bbox=(3, 3, 0, 4))]
    for k, a in enumerate(anns):
        a["id"] = 10 + k
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": anns,
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path)
    assert [aid for aid, _ in ds.degenerate] == [11, 12, 13]
    assert ds[0].ann_ids.tolist() == [10] and ds[0].masks.shape[0] == 1
    assert list(ds.coco.anns) == [10]  # the pycocotools index (evaluation's ground truth) has none either
    assert find_degenerate(anns, {1: data["images"][0]}) == ds.degenerate
    line = describe_degenerate(ds.degenerate, limit=2)
    assert line.startswith("skipped 3 degenerate annotation(s)") and "annotation id 11" in line
    assert "annotation id 13" not in line and "and 1 more" in line
