"""COCO reader: every quirk of tests/coco_fixture.py, and every bad input with its culprit named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from mfdetr.data.coco import CocoDataset, load_image
from mfdetr.errors import MfdetrError
from tests.coco_fixture import (
    BAD_IMAGE_IDS,
    BAD_KINDS,
    DEGENERATE_ANN,
    EXPECTED,
    make_bad_coco,
    make_quirky_coco,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def quirky(tmp_path_factory) -> tuple[Path, Path]:
    return make_quirky_coco(tmp_path_factory.mktemp("quirky"))


@pytest.fixture(scope="module")
def samples(quirky):
    ds = CocoDataset(*quirky)
    return ds, {s.image_id: s for s in (ds[i] for i in range(len(ds)))}


def test_index_order_and_categories(quirky, samples):
    ds, _ = samples
    assert ds.image_ids == sorted(EXPECTED) and len(ds) == len(EXPECTED)
    assert [c["id"] for c in ds.categories] == [1, 5, 90]
    for i, iid in enumerate(ds.image_ids):
        assert ds.image_info(i)["id"] == iid
        assert ds.image_path(i) == quirky[1] / EXPECTED[iid][0]
    assert len(ds.fingerprint) == 64
    assert CocoDataset(*quirky).fingerprint == ds.fingerprint
    assert "info" not in json.loads(quirky[0].read_text())


@pytest.mark.parametrize("iid", sorted(EXPECTED))
def test_modes_give_rgb(samples, iid):
    _, by_id = samples
    _, w, h, (r, c), rgb, tol = EXPECTED[iid]
    img = by_id[iid].image
    assert img.dtype == torch.uint8 and img.shape == (3, h, w)
    assert (img[:, r, c].int() - torch.tensor(rgb)).abs().max() <= tol, img[:, r, c]


def test_sixteen_bit_scaled_and_exif_ignored(samples):
    _, by_id = samples
    assert by_id[100].image[:, 0, 0].tolist() == [255, 255, 255]  # 65535 -> 255
    img = by_id[55].image  # EXIF orientation 6 ignored: stored 40x20, white left half
    assert img.shape == (3, 20, 40) and img[0, 10, 35] < 10


def test_masks_equal_pycocotools(quirky, samples):
    _, by_id = samples
    ref = COCO(str(quirky[0]))  # pycocotools' own reading of the same file
    n = 0
    for s in by_id.values():
        assert s.masks.shape == (len(s.ann_ids),) + tuple(s.image.shape[1:])
        for k, aid in enumerate(s.ann_ids.tolist()):
            ann = copy.deepcopy(ref.anns[aid])
            if aid == DEGENERATE_ANN:  # the reader drops polygon parts of < 3 points
                ann["segmentation"] = [p for p in ann["segmentation"] if len(p) >= 6]
            assert np.array_equal(s.masks[k].numpy(), ref.annToMask(ann).astype(bool)), aid
            x, y, w, h = ann["bbox"]
            assert s.boxes[k].tolist() == [x, y, x + w, y + h]
            assert s.labels[k] == ann["category_id"] and s.iscrowd[k] == bool(ann["iscrowd"])
            assert s.area[k] == pytest.approx(ann["area"])
            n += 1
    assert n == len(ref.anns)


def test_quirk_details(samples):
    _, by_id = samples
    assert by_id[3].iscrowd.tolist() == [False, True]  # crowd kept, flagged
    assert by_id[3].labels.tolist() == [5, 90]
    m = by_id[3].masks[0]
    assert m[3, 3] and m[8, 31] and not m[8, 20]  # two separate polygon parts
    ring = by_id[25].masks[0]
    assert ring[12, 4] and not ring[12, 12]  # compressed RLE with a hole
    empty = by_id[7]
    assert empty.boxes.shape == (0, 4) and empty.masks.shape == (0, 16, 24) and empty.labels.numel() == 0
    assert by_id[100].masks[1].sum() == 25  # degenerate part dropped, the 5x5 square kept


def test_load_masks_false(quirky):
    ds = CocoDataset(*quirky, load_masks=False)
    s = ds[0]
    assert s.masks is None and s.boxes.shape[0] == 2


def test_load_image_modes(quirky):
    _, root = quirky
    img = load_image(root / "palette.png")
    assert img.shape == (3, 24, 24) and img[:, 0, 0].tolist() == [12, 34, 56]


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_names_culprit(tmp_path, kind):
    ann, root, must = make_bad_coco(tmp_path, kind)
    with pytest.raises(MfdetrError) as exc:
        ds = CocoDataset(ann, root)
        for i in range(len(ds)):
            ds[i]
    msg = str(exc.value)
    for part in must:
        assert part in msg, (part, msg)
    assert BAD_KINDS[kind] == (kind in BAD_IMAGE_IDS)


def test_json_errors_raise_even_with_skip_bad(tmp_path):
    ann, root, must = make_bad_coco(tmp_path, "unknown_category")
    with pytest.raises(MfdetrError, match="annotation id 105"):
        CocoDataset(ann, root, skip_bad=True)


def test_skip_bad_collects_and_keeps_the_rest(tmp_path):
    kinds = sorted(BAD_IMAGE_IDS)
    ann, root, _ = make_bad_coco(tmp_path, *kinds)
    bad_ids = set(BAD_IMAGE_IDS.values())
    ds = CocoDataset(ann, root, skip_bad=True)
    got = {ds.image_ids[i]: ds[i] for i in range(len(ds))}
    assert {i for i, s in got.items() if s is None} == bad_ids
    assert {s.image_id for s in got.values() if s is not None} == set(EXPECTED) - bad_ids
    assert {i for i, _ in ds.bad} == bad_ids and len(ds.bad) == len(bad_ids)
    for iid, reason in ds.bad:
        assert f"image id {iid}" in reason


def test_check_reports_up_front(tmp_path):
    ann, root, _ = make_bad_coco(tmp_path, *sorted(BAD_IMAGE_IDS))
    ds = CocoDataset(ann, root)
    header = {i for i, _ in ds.check(progress=False)}
    assert {10, 40, 11} <= header <= set(BAD_IMAGE_IDS.values())  # missing, unreadable, wrong size
    full = {i for i, _ in CocoDataset(ann, root).check(progress=False, full=True)}
    assert full == set(BAD_IMAGE_IDS.values())
    good = CocoDataset(ann, root, skip_bad=True)
    good.check(progress=False, full=True)
    assert sum(good[i] is not None for i in range(len(good))) == len(EXPECTED) - len(BAD_IMAGE_IDS)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(MfdetrError, match="nope.json"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


def test_truncated_image_loads_nowhere(tmp_path):
    p = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(p, quality=90)
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(MfdetrError, match="t.jpg"):
        load_image(p)
