"""Mask pasting and RLE encoding against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

from mfdetr.evaluate.coco_results import encode_crops, encode_full
from mfdetr.evaluate.paste import (
    Crop,
    box_extent,
    crops_to_full,
    paste_box_np,
    paste_crops_np,
    paste_masks_torch,
)


def naive_paste_f64(prob: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Reference: every pixel of the full image, float64, bilinear read of the zero-padded mask at the
    pixel centre's box-frame coordinate, restricted to the pixels that intersect the box."""
    m_h, m_w = prob.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    padded = np.pad(prob.astype(np.float64), 1)
    ys = np.arange(height) + 0.5
    xs = np.arange(width) + 0.5
    v = (ys - y0) * m_h / (y1 - y0) - 0.5
    u = (xs - x0) * m_w / (x1 - x0) - 0.5
    out = np.zeros((height, width))
    for yi in range(height):
        for xi in range(width):
            i0, j0 = int(np.floor(v[yi])), int(np.floor(u[xi]))
            fy, fx = v[yi] - i0, u[xi] - j0
            acc = 0.0
            for di, wy in ((0, 1 - fy), (1, fy)):
                for dj, wx in ((0, 1 - fx), (1, fx)):
                    i, j = i0 + di, j0 + dj
                    if 0 <= i < m_h and 0 <= j < m_w:
                        acc += wy * wx * padded[i + 1, j + 1]
            out[yi, xi] = acc
    keep = np.zeros((height, width), bool)
    ya, yb, xa, xb = box_extent(box, height, width)
    keep[ya:yb, xa:xb] = True
    return np.where(keep, out, 0.0)


def detectron2_full_image(prob: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """detectron2's ``_do_paste_mask`` (skip_empty=False): grid_sample over the whole image, float64."""
    x0, y0, x1, y1 = (float(v) for v in box)
    gy = (torch.arange(height, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
    gx = (torch.arange(width, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack([gx[None, :].expand(height, width), gy[:, None].expand(height, width)], -1)[None]
    p = torch.from_numpy(prob.astype(np.float64))[None, None]
    return F.grid_sample(p, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()


def random_boxes(rng, n, height, width):
    """Boxes of every kind: inside, crossing each border, sub-pixel, large."""
    boxes = []
    for _ in range(n):
        w = rng.choice([rng.uniform(0.3, 3), rng.uniform(3, 30), rng.uniform(30, 1.3 * width)])
        h = rng.choice([rng.uniform(0.3, 3), rng.uniform(3, 30), rng.uniform(30, 1.3 * height)])
        x0 = rng.uniform(-0.5 * w, width - 0.5 * w)
        y0 = rng.uniform(-0.5 * h, height - 0.5 * h)
        boxes.append([x0, y0, x0 + w, y0 + h])
    return np.array(boxes)


@pytest.fixture
def case():
    rng = np.random.default_rng(7)
    height, width, m = 37, 53, 12
    boxes = random_boxes(rng, 24, height, width)
    boxes[0] = [-5.2, -3.1, 20.7, 15.5]  # top-left corner crossing
    boxes[1] = [40.3, 25.9, 60.0, 45.0]  # bottom-right corner crossing
    boxes[2] = [10.0, 10.0, 20.0, 20.0]  # integer aligned
    probs = rng.random((len(boxes), m, m)).astype(np.float32)
    probs[3] = 1.0  # saturated: edge pixels sit exactly at 0.5 where the centre is on the border
    return probs, boxes, height, width


def test_paste_np_equals_naive_float64(case):
    probs, boxes, height, width = case
    for prob, box in zip(probs, boxes):
        ref = naive_paste_f64(prob, box, height, width)
        vals, ya, xa = paste_box_np(prob, box, height, width)
        full = np.zeros((height, width))
        full[ya : ya + vals.shape[0], xa : xa + vals.shape[1]] = vals
        np.testing.assert_allclose(full, ref, atol=2e-6)


def test_paste_thresholded_equals_detectron2_full_image(case):
    probs, boxes, height, width = case
    crops = paste_crops_np(probs, boxes, height, width, 0.5)
    ours = crops_to_full(crops, height, width)
    for k, (prob, box) in enumerate(zip(probs, boxes)):
        ref = detectron2_full_image(prob, box, height, width) >= 0.5
        # only float32-vs-float64 ties at exactly 0.5 may differ
        diff = ours[k] != ref
        if diff.any():
            near = np.abs(detectron2_full_image(prob, box, height, width) - 0.5) < 1e-5
            assert (near | ~diff).all(), (k, box)


def test_paste_torch_chunked_equals_np(case):
    probs, boxes, height, width = case
    np_crops = paste_crops_np(probs, boxes, height, width, 0.5)
    for mem_limit in (1 << 30, 4000):  # one chunk; many small chunks
        t_crops = paste_masks_torch(
            torch.from_numpy(probs), torch.from_numpy(boxes).float(), height, width, 0.5, mem_limit
        )
        a = crops_to_full(np_crops, height, width)
        b = crops_to_full(t_crops, height, width)
        mismatch = (a != b).sum()
        assert mismatch <= 2, mismatch  # float32 summation order only
        for c1, c2 in zip(np_crops, t_crops):
            assert (c1.y0, c1.x0, c1.mask.shape) == (c2.y0, c2.x0, c2.mask.shape)


def test_paste_degenerate_boxes():
    prob = np.ones((8, 8), np.float32)
    for box in ([5, 5, 5, 9], [5, 5, 9, 5], [-10, -10, -1, -1], [60, 5, 70, 9], [9, 9, 3, 3]):
        (crop,) = paste_crops_np(prob[None], np.array([box], float), 20, 30)
        assert not crop.mask.any()
        (tcrop,) = paste_masks_torch(
            torch.from_numpy(prob[None]), torch.tensor([box], dtype=torch.float32), 20, 30
        )
        assert not tcrop.mask.any()
    assert paste_masks_torch(torch.zeros(0, 8, 8), torch.zeros(0, 4), 20, 30) == []


def test_paste_close_to_torchvision():
    """torchvision's paste_masks_in_image pads the mask by one cell, scales the box by (M+2)/M and
    rounds it to integers, so it is only close; large smooth masks must agree to IoU >= 0.9."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    m = 28
    yy, xx = np.meshgrid((np.arange(m) + 0.5) / m * 2 - 1, (np.arange(m) + 0.5) / m * 2 - 1, indexing="ij")
    prob = (1 / (1 + np.exp(-8 * (0.8 - np.sqrt(xx**2 + yy**2))))).astype(np.float32)
    boxes = np.array([[10.0, 12.0, 70.0, 60.0], [-10.0, 30.0, 40.0, 95.0], [55.5, 40.25, 99.0, 79.75]])
    height, width = 80, 100
    ours = crops_to_full(paste_crops_np(np.repeat(prob[None], 3, 0), boxes, height, width), height, width)
    tv = paste_masks_in_image(
        torch.from_numpy(np.repeat(prob[None, None], 3, 0)), torch.from_numpy(boxes).float(), (height, width)
    )
    tv = (tv[:, 0] >= 0.5).numpy()
    for a, b in zip(ours, tv):
        iou = (a & b).sum() / (a | b).sum()
        assert iou >= 0.9, iou


def test_rle_equals_pycocotools_encode():
    rng = np.random.default_rng(3)
    height, width = 23, 31
    crops = [
        Crop(np.zeros((0, 0), bool), 0, 0),
        Crop(np.zeros((5, 4), bool), 3, 3),
        Crop(np.ones((height, width), bool), 0, 0),  # full image: first and last pixel set
        Crop(np.ones((1, 1), bool), 0, 0),
        Crop(np.ones((1, 1), bool), height - 1, width - 1),
        Crop(np.ones((height, 1), bool), 0, 5),  # a whole column: runs merge across columns
    ]
    for _ in range(40):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crops.append(Crop(rng.random((h, w)) < rng.uniform(0.05, 0.95), int(y0), int(x0)))
    ours = encode_crops(crops, height, width)
    dense = crops_to_full(crops, height, width)
    ref = encode_full(dense)
    assert ours == ref
    for r, d in zip(ours, dense):
        assert isinstance(r["counts"], str)
        back = mask_util.decode({"size": r["size"], "counts": r["counts"].encode()})
        assert (back.astype(bool) == d).all()
    assert encode_crops([], height, width) == []
