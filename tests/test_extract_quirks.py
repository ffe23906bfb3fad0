"""Extraction over the quirky COCO fixture, with bad images skipped (or stopping with a clear error)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mfdetr.cache.inspect import cache_info, verify
from mfdetr.cache.reader import CacheDataset
from mfdetr.data.coco import CocoDataset
from mfdetr.errors import MfdetrError
from mfdetr.extract.loop import ExtractOptions
from mfdetr.extract.matching import compute_targets, unpack_masks
from tests.coco_fixture import make_bad_coco, make_quirky_coco
from tests.fake_detector import FakeDetector
from tests.tiny_cache import extract_into, sample_gt

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class OracleDetector(FakeDetector):
    """The fake detector, plus every annotation's own box (crowd ones too) as extra predictions."""

    def __init__(self, ds: CocoDataset, **kw):
        super().__init__(categories=ds.categories, **kw)
        self.ds = ds

    def detect(self, images):
        outs = super().detect(images)
        for img, o in zip(images, outs):
            # find the dataset image by content (the fixture's images are distinct)
            j = next(i for i in range(len(self.ds)) if self._same(i, img))
            s = self.ds[j]
            k = min(self.topk, s.boxes.shape[0] + o.boxes.shape[0])
            n_gt = min(k, s.boxes.shape[0])
            o.boxes = torch.cat([s.boxes[:n_gt], o.boxes])[:k]
            o.scores = torch.linspace(0.99, 0.01, k)
            o.labels = torch.cat([s.labels[:n_gt], o.labels])[:k]
            o.queries = torch.cat([torch.zeros(n_gt, self.query_dim), o.queries])[:k]
        return outs

    def _same(self, i, img):
        try:
            s = self.ds[i]
        except MfdetrError:
            return False
        return s is not None and s.image.shape == img.shape and torch.equal(s.image, img)


def test_quirky_dataset_extracts_and_crowd_is_never_a_target(tmp_path):
    ann, root = make_quirky_coco(tmp_path / "q")
    ds = CocoDataset(ann, root)
    det = OracleDetector(ds, topk=8)
    res = extract_into(det, root, ann, tmp_path / "c.zarr", ExtractOptions(topk=8, block=3))
    assert res.images_done == len(ds) == 9 and not res.bad
    data = json.loads(Path(ann).read_text())
    crowd = {a["id"] for a in data["annotations"] if a.get("iscrowd")}
    normal = {a["id"] for a in data["annotations"] if not a.get("iscrowd")}
    assert crowd
    cache = CacheDataset(res.path)
    assert cache.image_ids == sorted(i["id"] for i in data["images"])  # sparse ids, sorted
    matched = set()
    for j in range(len(cache)):
        r = cache[j]
        s = ds[j]
        ids = set(r["match_ann_id"].tolist()) - {-1}
        assert not ids & crowd
        matched |= ids
        gt = sample_gt(s)
        t = compute_targets(r["boxes"], r["labels"], r["scores"], r["num_boxes"], gt, "iou", 0.5, 64)
        assert np.array_equal(r["match_ann_id"].numpy(), t["match_ann_id"])
        assert np.array_equal(r["mask_targets"].numpy(), unpack_masks(t["mask_targets"], 64))
    # every non-crowd annotation with a non-empty mask is its own oracle box's target
    nonempty = {a["id"] for a in data["annotations"] if a["id"] in normal and a["area"] > 0}
    assert nonempty <= matched
    assert verify(res.path) == []


def _extract_bad(ds, root, ann, tmp_path, **kw):
    det = FakeDetector(categories=ds.categories, topk=6)
    return extract_into(det, root, ann, tmp_path / "c.zarr", ExtractOptions(topk=6, block=2), **kw)


def test_bad_images_skipped_with_skip_bad(tmp_path):
    ann, root, _ = make_bad_coco(tmp_path / "b", "missing_file", "truncated_png", "size_mismatch")
    ds = CocoDataset(ann, root)
    res = _extract_bad(ds, root, ann, tmp_path, workers=2, skip_bad=True)
    assert sorted(i for i, _ in res.bad) == [3, 10, 11] and res.images_bad == 3
    assert any("gray.png" in r for _, r in res.bad)
    assert res.images_done == 9  # bad images are done too (flagged), so a re-run does nothing
    info = cache_info(res.path)
    assert info["images_bad"] == 3 and info["images_done"] == 9
    cache = CacheDataset(res.path)
    assert cache.image_ids == [7, 25, 40, 41, 55, 100]
    assert verify(res.path) == []
    again = _extract_bad(ds, root, ann, tmp_path, skip_bad=True)
    assert again.reused and again.images_bad == 3 and again.bad == []


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_without_skip_bad_is_a_clear_error(tmp_path, workers):
    ann, root, must = make_bad_coco(tmp_path / "b", "missing_file")
    ds = CocoDataset(ann, root)
    with pytest.raises(MfdetrError) as e:
        _extract_bad(ds, root, ann, tmp_path, workers=workers)
    msg = str(e.value)
    assert all(m in msg for m in must) and "Traceback" not in msg
