"""Matching rules and mask-target crops against brute-force / float64 numpy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mfdetr.extract.matching import (
    box_iou,
    compute_targets,
    crop_mask_targets,
    generalized_box_iou,
    hungarian_cost,
    match_boxes,
    pack_masks,
    unpack_masks,
)


def _rand_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(2, size * 0.5, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def _iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    ua = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def test_box_iou_and_giou_match_reference():
    rng = np.random.default_rng(0)
    a, b = _rand_boxes(rng, 7), _rand_boxes(rng, 5)
    iou = box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    ref = np.array([[_iou_ref(x, y) for y in b] for x in a])
    np.testing.assert_allclose(iou, ref, atol=1e-12)
    g = generalized_box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    for i, j in itertools.product(range(7), range(5)):
        x, y = a[i], b[j]
        enc = (max(x[2], y[2]) - min(x[0], y[0])) * (max(x[3], y[3]) - min(x[1], y[1]))
        inter = max(0, min(x[2], y[2]) - max(x[0], y[0])) * max(0, min(x[3], y[3]) - max(x[1], y[1]))
        union = (x[2] - x[0]) * (x[3] - x[1]) + (y[2] - y[0]) * (y[3] - y[1]) - inter
        assert g[i, j] == pytest.approx(inter / union - (enc - union) / enc, abs=1e-12)
    # degenerate boxes: IoU 0, never NaN
    z = box_iou(torch.tensor([[5.0, 5, 5, 5]]), torch.tensor([[5.0, 5, 5, 5], [0, 0, 10, 10]]))
    assert torch.equal(z, torch.zeros(1, 2, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
def test_iou_rule_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    gt = _rand_boxes(rng, 6)
    # predictions: jittered copies of GTs (some duplicates) plus random boxes
    pred = np.concatenate([gt[rng.integers(0, 6, 10)] + rng.normal(0, 4, (10, 4)), _rand_boxes(rng, 5)])
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
    crowd = np.zeros(6, bool)
    crowd[rng.integers(0, 6)] = True
    thr = 0.5
    gi, iou = match_boxes(pred, gt, crowd, "iou", thr)
    for k, p in enumerate(pred):
        best, best_j = -1.0, -1
        for j, g in enumerate(gt):
            if crowd[j]:
                continue
            v = _iou_ref(p, g)
            if v > best:
                best, best_j = v, j
        if best >= thr and best > 0:
            assert gi[k] == best_j and iou[k] == pytest.approx(best, abs=1e-6)
        else:
            assert gi[k] == -1 and iou[k] == 0
    assert not np.isin(gi, np.flatnonzero(crowd)).any()
    assert (gi >= 0).sum() >= 3  # the jittered copies do match (one-to-many allowed)


def test_iou_rule_is_one_to_many_and_ignores_class():
    gt = np.array([[10.0, 10, 50, 50]])
    pred = np.array([[10.0, 10, 50, 50], [12, 11, 52, 49], [60, 60, 90, 90]])
    gi, iou = match_boxes(pred, gt, None, "iou", 0.5, pred_labels=[3, 7, 3], gt_labels=[3])
    assert gi.tolist() == [0, 0, -1]
    assert iou[0] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_is_optimal_one_to_one(seed):
    rng = np.random.default_rng(100 + seed)
    g, k = 3, 5
    gt = _rand_boxes(rng, g)
    pred = np.concatenate([gt + rng.normal(0, 3, gt.shape), _rand_boxes(rng, k - g)])
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
    gl = rng.integers(1, 4, g)
    pl = rng.integers(1, 4, k)
    ps = rng.uniform(0.1, 1.0, k)
    size = (100, 120)
    gi, iou = match_boxes(
        pred, gt, None, "hungarian", 0.0, pred_labels=pl, pred_scores=ps, gt_labels=gl, image_size=size
    )
    cost = hungarian_cost(
        torch.tensor(pred), torch.tensor(pl), torch.tensor(ps), torch.tensor(gt), torch.tensor(gl), size
    ).numpy()
    best = min(sum(cost[p, j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(k), g))
    got_pairs = [(r, int(c)) for r, c in enumerate(gi) if c >= 0]
    assert len(got_pairs) == sum(1 for r, c in got_pairs if iou[r] > 0)  # every kept pair overlaps
    assert len({c for _, c in got_pairs}) == len(got_pairs)  # one-to-one
    if len(got_pairs) == g:  # nothing dropped for IoU 0: the assignment is optimal
        assert sum(cost[r, c] for r, c in got_pairs) == pytest.approx(best, abs=1e-9)
    # with a threshold, only pairs with IoU >= threshold survive
    gi2, iou2 = match_boxes(
        pred, gt, None, "hungarian", 0.5, pred_labels=pl, pred_scores=ps, gt_labels=gl, image_size=size
    )
    assert ((iou2 >= 0.5) | (gi2 == -1)).all()
    assert set(np.flatnonzero(gi2 >= 0)) <= set(np.flatnonzero(gi >= 0))


def test_hungarian_never_matches_crowd():
    gt = np.array([[10.0, 10, 50, 50], [60, 60, 90, 90]])
    pred = np.array([[60.0, 60, 90, 90], [10, 10, 50, 50]])
    gi, _ = match_boxes(
        pred,
        gt,
        [False, True],
        "hungarian",
        0.5,
        pred_labels=[1, 1],
        pred_scores=[0.9, 0.8],
        gt_labels=[1, 1],
        image_size=(100, 100),
    )
    assert gi.tolist() == [-1, 0]


def _bilinear(v, y, x):
    h, w = v.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * v[y0, x0]
        + (1 - ly) * lx * v[y0, x1]
        + ly * (1 - lx) * v[y1, x0]
        + ly * lx * v[y1, x1]
    )


def _crop_ref(mask, box, s, sampling=2):
    """float64 RoIAlign (aligned=True, spatial_scale 1), written independently of torchvision."""
    v = mask.astype(np.float64)
    x1, y1, x2, y2 = (float(c) - 0.5 for c in box)
    bh, bw = (y2 - y1) / s, (x2 - x1) / s
    out = np.zeros((s, s))
    for i in range(s):
        for j in range(s):
            acc = 0.0
            for a in range(sampling):
                for b in range(sampling):
                    y = y1 + i * bh + (a + 0.5) * bh / sampling
                    acc += _bilinear(v, y, x1 + j * bw + (b + 0.5) * bw / sampling)
            out[i, j] = acc / sampling**2
    return out


def test_mask_crop_matches_float64_reference():
    h, w = 40, 56
    yy, xx = np.mgrid[:h, :w]
    masks = np.stack(
        [
            (yy - 20) ** 2 + (xx - 25) ** 2 < 120,  # disc
            ((yy - 12) ** 2 + (xx - 40) ** 2 < 80) & ((yy - 12) ** 2 + (xx - 40) ** 2 > 20),  # ring
            (yy > 25) & (xx < 15),  # corner block
        ]
    )
    boxes = np.array(
        [
            [14.3, 9.2, 36.7, 31.1],
            [30.0, 2.5, 51.4, 22.0],
            [-3.0, 24.0, 18.5, 44.0],
            [5.0, 5.0, 5.5, 30.0],
            [0, 0, 56, 40],
        ],
        dtype=np.float32,
    )
    gi = np.array([0, 1, 2, 0, -1])
    s = 16
    got = crop_mask_targets(torch.from_numpy(masks), torch.from_numpy(boxes), gi, s)
    assert got.shape == (5, s, s) and got.dtype == bool
    assert not got[4].any()  # unmatched: empty
    for k in range(4):
        ref = _crop_ref(masks[gi[k]], boxes[k].astype(np.float64), s)
        disagree = got[k] != (ref >= 0.5)
        assert not (disagree & (np.abs(ref - 0.5) > 1e-5)).any(), k
    assert got[0].sum() > 0.5 * s * s  # the disc fills most of its box
    assert not got[1][s // 2, s // 2]  # the ring's hole is in the middle of its crop


def test_pack_roundtrip_and_compute_targets():
    rng = np.random.default_rng(7)
    m = rng.random((3, 5, 64, 64)) > 0.5
    p = pack_masks(m)
    assert p.shape == (3, 5, 64, 8) and p.dtype == np.uint8
    assert np.array_equal(unpack_masks(p, 64), m)

    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    masks = torch.from_numpy(
        np.stack([(yy < 30) & (xx < 40), (yy >= 30) & (xx >= 40), np.ones((h, w), bool)])
    )
    gt = {
        "boxes": torch.tensor([[0.0, 0, 40, 30], [40, 30, 80, 60], [0, 0, 80, 60]]),
        "labels": torch.tensor([1, 2, 1]),
        "iscrowd": torch.tensor([False, False, True]),
        "ann_ids": torch.tensor([11, 22, 33]),
        "masks": masks,
        "orig_size": (h, w),
    }
    k = 6
    boxes = torch.zeros(k, 4)
    boxes[:4] = torch.tensor([[0.0, 0, 40, 30], [42, 31, 80, 60], [0, 0, 80, 60], [1, 1, 39, 29]])
    boxes[4] = torch.tensor([0.0, 0, 40, 30])  # a padded row: must stay unmatched
    t = compute_targets(boxes, torch.tensor([1, 2, 1, 1, -1, -1]), torch.rand(k), 4, gt, "iou", 0.5, 16)
    assert t["match_ann_id"].tolist() == [11, 22, -1, 11, -1, -1]  # the full-image box only hits the crowd GT
    assert t["match_iou"][2] == 0 and t["match_iou"][0] == pytest.approx(1.0)
    mt = unpack_masks(t["mask_targets"], 16)
    assert mt[0].all() and mt[3].all() and not mt[2].any() and not mt[4:].any()
    # no GT at all
    empty = {
        **gt,
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "iscrowd": torch.zeros(0, dtype=torch.bool),
        "ann_ids": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, h, w, dtype=torch.bool),
    }
    t = compute_targets(
        boxes, torch.ones(k, dtype=torch.int64), torch.rand(k), 4, empty, "hungarian", 0.5, 16
    )
    assert (t["match_ann_id"] == -1).all() and not t["mask_targets"].any()
