"""Paste box-frame mask probabilities into the original image, only inside each box.

Geometry (the same as detectron2's ``paste_masks_in_image`` / ``F.grid_sample(align_corners=False)``):
an ``M x M`` box-frame mask covers the box ``(x0, y0, x1, y1)`` (original pixels, continuous
coordinates, pixel ``j`` spans ``[j, j+1)``); mask cell ``i`` has its centre at
``x0 + (i + 0.5) * (x1 - x0) / M`` -- the points RoIAlign(``aligned=True``) samples when the mask
targets are cropped. Image pixel ``x`` (centre ``x + 0.5``) therefore reads the mask at the
continuous cell index ``u = (x + 0.5 - x0) * M / (x1 - x0) - 0.5``, bilinearly, with zeros outside the
mask (detectron2's zero padding: the mask fades out over the last half cell).

Bilinear sampling on a separable grid is separable: interpolate the rows, then the columns (two
gathers, ``O(h * w)``), or as a product of two interpolation matrices ``Ry @ P @ Rx.T`` (``Ry [h, M]``,
``Rx [w, M]``; the batched GPU form). Exact, and far cheaper than upsampling to the full image.

Only the pixels that intersect the box, ``[floor(x0), ceil(x1)) x [floor(y0), ceil(y1))`` clipped to the
image, are computed; every other pixel is 0. For ``threshold >= 0.5`` this equals detectron2's result
after thresholding exactly (a pixel whose centre is outside the box reads at most half of the edge
cell's probability, so it never reaches 0.5).

Two implementations of the same math:
- :func:`paste_box_np` -- one box, numpy float32 gathers (CPU; what the evaluation workers run);
- :func:`paste_masks_torch` -- a chunk of boxes at once on any torch device (GPU), each box padded to
  the chunk's largest extent and the padding zeroed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Crop:
    """A thresholded mask restricted to its box's pixel extent.

    mask: [h, w] bool, rows ``y0 .. y0+h-1`` and columns ``x0 .. x0+w-1`` of the image (h or w may be 0).
    """

    mask: np.ndarray
    y0: int
    x0: int


def box_extent(box: np.ndarray | list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel extent ``(ya, yb, xa, xb)`` (half-open) a box covers, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xa = min(max(math.floor(x0), 0), width)
    xb = min(max(math.ceil(x1), xa), width)
    ya = min(max(math.floor(y0), 0), height)
    yb = min(max(math.ceil(y1), ya), height)
    return ya, yb, xa, xb


def _axis_taps_np(
    lo: float, hi: float, start: int, length: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of pixels ``start..start+length-1`` on a box side ``[lo, hi]`` sampled by ``m`` cells.

    Returns ``(i0, i1, w0, w1)``: indices into the zero-PADDED mask axis (``m + 2`` long: 0 and m+1 are
    the zero border, so a tap outside the mask reads 0) and their float32 weights.
    """
    centres = np.arange(start, start + length, dtype=np.float64) + 0.5
    u = (centres - lo) * (m / (hi - lo)) - 0.5
    f = np.floor(u)
    w1 = u - f
    i = f.astype(np.int64)
    return (
        np.clip(i + 1, 0, m + 1),
        np.clip(i + 2, 0, m + 1),
        (1.0 - w1).astype(np.float32),
        w1.astype(np.float32),
    )


def paste_box_np(
    prob: np.ndarray, box: np.ndarray | list[float], height: int, width: int
) -> tuple[np.ndarray, int, int]:
    """Paste one ``[M, M]`` probability map into its box.

    Returns ``(values [h, w] float32, y0, x0)``: the pasted probabilities over the box's pixel extent.
    Separable bilinear interpolation as two gathers (rows, then columns) of the zero-padded mask:
    no BLAS, no full-image buffer.
    """
    ya, yb, xa, xb = box_extent(box, height, width)
    x0, y0, x1, y1 = (float(v) for v in box)
    if yb <= ya or xb <= xa or x1 <= x0 or y1 <= y0:
        return np.zeros((max(yb - ya, 0), max(xb - xa, 0)), np.float32), ya, xa
    m_h, m_w = prob.shape
    p = np.zeros((m_h + 2, m_w + 2), np.float32)
    p[1:-1, 1:-1] = prob
    r0, r1, wr0, wr1 = _axis_taps_np(y0, y1, ya, yb - ya, m_h)
    c0, c1, wc0, wc1 = _axis_taps_np(x0, x1, xa, xb - xa, m_w)
    rows = p[r0] * wr0[:, None] + p[r1] * wr1[:, None]  # [h, M+2]
    vals = rows[:, c0] * wc0[None, :] + rows[:, c1] * wc1[None, :]  # [h, w]
    return vals, ya, xa


def paste_crops_np(
    probs: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> list[Crop]:
    """Per box on CPU: ``probs [N, M, M]``, ``boxes [N, 4]`` xyxy original px -> N thresholded crops."""
    crops = []
    for prob, box in zip(probs, boxes):
        vals, ya, xa = paste_box_np(prob, box, height, width)
        crops.append(Crop(vals >= threshold, ya, xa))
    return crops


def _axis_weights_torch(lo: Tensor, hi: Tensor, start: Tensor, end: Tensor, length: int, m: int) -> Tensor:
    """[n, length, m] weights; rows at or beyond each box's own ``end`` are zero."""
    n = lo.shape[0]
    pix = start[:, None] + torch.arange(length, device=lo.device, dtype=torch.int64)[None, :]
    centres = pix.to(torch.float64) + 0.5
    u = (centres - lo[:, None].double()) * (m / (hi - lo).double()[:, None]) - 0.5
    i0 = torch.floor(u)
    f = u - i0
    i0 = i0.to(torch.int64)
    inside = (pix < end[:, None]).double()
    w = torch.zeros((n, length, m + 2), dtype=torch.float64, device=lo.device)
    w.scatter_(2, (i0 + 1).clamp(0, m + 1)[..., None], ((1.0 - f) * inside)[..., None])
    w.scatter_add_(2, (i0 + 2).clamp(0, m + 1)[..., None], (f * inside)[..., None])
    return w[:, :, 1 : m + 1].float()


def paste_masks_torch(
    probs: Tensor,
    boxes: Tensor,
    height: int,
    width: int,
    threshold: float = 0.5,
    mem_limit: int = 1 << 28,
) -> list[Crop]:
    """Chunked paste on any device (GPU): ``probs [N, M, M]``, ``boxes [N, 4]`` -> N thresholded crops.

    Boxes are sorted by extent and grouped so one chunk's padded ``[n, h_max, w_max]`` float32 output
    stays under ``mem_limit`` bytes; the crops come back to the CPU as bool arrays.
    """
    n = int(boxes.shape[0])
    if n == 0:
        return []
    b = boxes.detach().double().cpu().numpy()
    ext = np.array([box_extent(bx, height, width) for bx in b], dtype=np.int64).reshape(n, 4)
    hs = ext[:, 1] - ext[:, 0]
    ws = ext[:, 3] - ext[:, 2]
    valid = (hs > 0) & (ws > 0) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    crops: list[Crop | None] = [None] * n
    for i in np.flatnonzero(~valid):
        crops[i] = Crop(np.zeros((max(hs[i], 0), max(ws[i], 0)), bool), int(ext[i, 0]), int(ext[i, 2]))
    order = [int(i) for i in np.argsort(-(hs * ws), kind="stable") if valid[i]]
    dev = probs.device
    boxes_d = boxes.to(dev, torch.float64)
    ext_d = torch.as_tensor(ext, device=dev)
    pos = 0
    while pos < len(order):
        # sorted by area descending: the first box of a chunk bounds its padded size
        h_max, w_max = int(hs[order[pos]]), int(ws[order[pos]])
        chunk = [order[pos]]
        pos += 1
        while pos < len(order):
            i = order[pos]
            hm, wm = max(h_max, int(hs[i])), max(w_max, int(ws[i]))
            if (len(chunk) + 1) * hm * wm * 4 > mem_limit:
                break
            h_max, w_max = hm, wm
            chunk.append(i)
            pos += 1
        idx = torch.as_tensor(chunk, device=dev)
        bx, ex = boxes_d[idx], ext_d[idx]
        p = probs[idx].float()
        m_h, m_w = p.shape[-2:]
        ry = _axis_weights_torch(bx[:, 1], bx[:, 3], ex[:, 0], ex[:, 1], h_max, m_h)
        rx = _axis_weights_torch(bx[:, 0], bx[:, 2], ex[:, 2], ex[:, 3], w_max, m_w)
        vals = torch.bmm(torch.bmm(ry, p), rx.transpose(1, 2))
        masks = (vals >= threshold).cpu().numpy()
        for j, i in enumerate(chunk):
            crops[i] = Crop(masks[j, : hs[i], : ws[i]].copy(), int(ext[i, 0]), int(ext[i, 2]))
    return crops  # type: ignore[return-value]


def crops_to_full(crops: list[Crop], height: int, width: int) -> np.ndarray:
    """Dense ``[N, H, W]`` bool masks from crops (tests, overlays of a single image)."""
    out = np.zeros((len(crops), height, width), dtype=bool)
    for k, c in enumerate(crops):
        h, w = c.mask.shape
        out[k, c.y0 : c.y0 + h, c.x0 : c.x0 + w] = c.mask
    return out
