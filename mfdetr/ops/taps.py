"""Tap lists of the fused RoIAlign: for every output bin, the buffer rows and weights it sums.

Bilinear sampling is separable. Per level and roi we compute, per output row, the y taps (cell row,
weight) of all its samples, merged into a window of ``K_y`` consecutive rows, and likewise per output
column (``K_x`` columns). A bin's taps are the outer product, ``K_y * K_x`` cells with weight
``wy * wx / count``; one bag holds a bin's taps of every level (or of one level, ``per_level``).

Rois differ in ``K`` (adaptive sampling), so the lists are ragged: per level the rois are grouped by
``(K_y, K_x)``; each group's block of taps is built with broadcasting in (roi, ph, ky, pw, kx) order
(long contiguous inner dims) and scattered into its place in the bag-major flat arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

LevelShape = tuple[int, int, int]  # (B, H, W)

MAX_TAPS = 2**31 - 1  # tap positions and bag offsets are int32
BLOCK = 1 << 20  # taps per build task


class TooManyTaps(Exception):
    pass


def axis_taps(start: Tensor, binsz: Tensor, grid: Tensor, n: int, size: int, ct: torch.dtype):
    """Merged 1-D taps of all samples of each output row (or column), for all rois of one level.

    start, binsz: [R] (ct); grid: [R] int64 samples per bin (0 = none). Torchvision's rules: a sample
    at y < -1 or y > size is 0, else y is clamped into [0, size-1]; taps floor(y), floor(y)+1 with
    weights 1-ly, ly. Returns idx [R,n,K] int32 (cells along this axis), w [R,n,K] (ct, sum of the
    sample weights) and k [R] int64: the taps each roi needs (its weight is all in idx[:, :, :k]; 0
    when no sample is valid).
    """
    R = start.shape[0]
    dev = start.device
    G = max(int(grid.max()), 1)
    p = torch.arange(n, dtype=ct, device=dev)
    i = torch.arange(G, dtype=ct, device=dev) + 0.5
    gf = grid.clamp(min=1).to(ct)
    # torchvision: y = roi_start + ph * bin_size + ((iy + .5) * bin_size) / grid, in this order
    y = (start[:, None] + p[None, :] * binsz[:, None])[:, :, None] + (
        i[None, :] * binsz[:, None] / gf[:, None]
    )[:, None, :]  # [R, n, G]
    valid = (y >= -1.0) & (y <= float(size))
    if int(grid.min()) < G:
        valid &= (torch.arange(G, device=dev)[None, :] < grid[:, None])[:, None, :]
    y = torch.nan_to_num_(y, nan=0.0).clamp_(0.0, float(size - 1))
    low = y.to(torch.int32)
    high = (low + 1).clamp_(max=size - 1)
    lw = (y - low).mul_(valid)  # ly; 0 on the last row (y is clamped to size-1 there)
    hw = valid.to(ct).sub_(lw)  # 1 - ly
    # window start: the lowest valid row (samples run backwards for reversed boxes)
    base = torch.where(valid, low, size).amin(dim=2, keepdim=True).clamp_(max=size - 1)
    rl = torch.where(valid, low - base, 0)
    rh = torch.where(valid, high - base, 0)
    k = torch.where(valid, rh + 1, 0).amax(dim=(1, 2)).to(torch.int64)
    K = int(k.max())
    if K <= 2 * G:
        K = max(K, 1)
        w = torch.zeros((R, n, K), dtype=ct, device=dev)
        w.scatter_add_(2, rl.long(), hw)
        w.scatter_add_(2, rh.long(), lw)
        idx = (base + torch.arange(K, dtype=torch.int32, device=dev)).clamp_(max=size - 1)
        return idx, w, k
    # samples far apart (fixed sampling_ratio, bins of many cells): keep both taps of every sample
    idx = torch.stack([low, high], dim=3).view(R, n, 2 * G)
    w = torch.stack([hw, lw], dim=3).view(R, n, 2 * G)
    k = torch.where(valid.flatten(1).any(dim=1), 2 * grid, 0)
    return idx, w, k


def build_taps(
    rois: Tensor,
    shapes: Sequence[LevelShape],
    spatial_scales: Sequence[float],
    out_hw: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    per_level: bool,
    ct: torch.dtype,
    run: Callable[[list[Callable[[], object]]], object],
):
    """Flat tap lists of all bags: (idx int32 [T], w ct [T], offsets int32 [nbags]).

    Bags are (roi, ph, pw) (or (roi, level, ph, pw) with ``per_level``), row-major. ``run(tasks)``
    executes the independent block-building tasks (they write disjoint parts of idx / w).
    """
    dev = rois.device
    Sh, Sw = out_hw
    P = Sh * Sw
    R = rois.shape[0]
    L = len(shapes)
    if R == 0:
        z32 = torch.zeros(0, dtype=torch.int32, device=dev)
        return z32, torch.zeros(0, dtype=ct, device=dev), z32
    r = rois.to(ct)
    bidx = r[:, 0].to(torch.int64)
    offset = 0.5 if aligned else 0.0
    levels = []
    row0 = 0
    for (B, H, W), scale in zip(shapes, spatial_scales):
        if H > 0 and W > 0 and B > 0:
            sc = torch.tensor(float(scale), dtype=ct, device=dev)  # torchvision casts the scale to T
            x1 = r[:, 1] * sc - offset
            y1 = r[:, 2] * sc - offset
            rw = r[:, 3] * sc - offset - x1
            rh = r[:, 4] * sc - offset - y1
            if not aligned:
                rw = rw.clamp(min=1.0)
                rh = rh.clamp(min=1.0)
            if sampling_ratio > 0:
                gy = torch.full((R,), sampling_ratio, dtype=torch.int64, device=dev)
                gx = gy
            else:
                # ceil(roi_size / output_size); non-finite sizes get no samples (torchvision: undefined)
                gy = torch.where(rh.isfinite(), torch.ceil(rh / Sh), 0.0).clamp(min=0).to(torch.int64)
                gx = torch.where(rw.isfinite(), torch.ceil(rw / Sw), 0.0).clamp(min=0).to(torch.int64)
            count = (gy * gx).clamp(min=1).to(ct)
            yi, wy, ky = axis_taps(y1, rh / Sh, gy, Sh, H, ct)
            xi, wx, kx = axis_taps(x1, rw / Sw, gx, Sw, W, ct)
            bad = (bidx < 0) | (bidx >= B)  # out-of-range batch index: 0 (torchvision reads out of bounds)
            ky = torch.where(bad, 0, ky)
            rowb = yi * W + (row0 + bidx.clamp(0, B - 1) * (H * W)).to(torch.int32)[:, None, None]
            levels.append((rowb, wy / count[:, None, None], xi, wx, ky, kx))
        else:
            z = torch.zeros(R, dtype=torch.int64, device=dev)
            levels.append((None, None, None, None, z, z))
        row0 += B * H * W

    t_rl = torch.stack([lv[4] * lv[5] for lv in levels], dim=1)  # [R, L] taps per bag and level
    t_r = t_rl.sum(dim=1)
    lvl_off = torch.cumsum(t_rl, dim=1) - t_rl
    per_roi = P * t_r  # taps of a roi (both layouts)
    roi_start = torch.cumsum(per_roi, dim=0) - per_roi
    total = int(per_roi.sum())
    if total > MAX_TAPS:
        raise TooManyTaps(total)
    pp = torch.arange(P, dtype=torch.int64, device=dev)
    if per_level:  # bag (r, l, p) starts at roi_start + P * lvl_off + p * t_rl
        a_rl = roi_start[:, None] + P * lvl_off
        s_rl = t_rl
        offsets = a_rl[:, :, None] + pp * s_rl[:, :, None]
    else:  # bag (r, p) starts at roi_start + p * t_r; level l's taps at + lvl_off
        a_rl = roi_start[:, None] + lvl_off
        s_rl = t_r[:, None].expand(R, L)
        offsets = roi_start[:, None] + pp * t_r[:, None]
    offsets = offsets.reshape(-1).to(torch.int32)

    idx = torch.empty(total, dtype=torch.int32, device=dev)
    w = torch.empty(total, dtype=ct, device=dev)
    k_max = max(int(torch.stack([lv[4].max(), lv[5].max()]).max()) for lv in levels)
    k_off = torch.arange(k_max + 1, dtype=torch.int64, device=dev)
    ph_off = torch.arange(Sh, dtype=torch.int64, device=dev) * Sw
    pw_off = torch.arange(Sw, dtype=torch.int64, device=dev)

    def block(rowb, wy, xi, wx, a_l, s_l, sel, Ky, Kx):
        def task():
            # (roi, ph, ky, pw, kx) order: long contiguous inner dims for the broadcasting ops
            blk_i = rowb[sel, :, :Ky, None, None] + xi[sel, None, None, :, :Kx]
            blk_w = wy[sel, :, :Ky, None, None] * wx[sel, None, None, :, :Kx]
            st = s_l[sel]
            pa = (a_l[sel][:, None, None] + ph_off[None, :, None] * st[:, None, None]) + k_off[:Ky] * Kx
            pb = pw_off[None, :, None] * st[:, None, None] + k_off[:Kx]
            pos = (pa[:, :, :, None, None] + pb[:, None, None, :, :]).view(-1)
            idx.scatter_(0, pos, blk_i.view(-1))
            w.scatter_(0, pos, blk_w.view(-1))

        return task

    tasks = []
    for lvl, (rowb, wy, xi, wx, ky, kx) in enumerate(levels):
        if rowb is None:
            continue
        kxs = int(kx.max()) + 1
        key = torch.where(ky * kx > 0, ky * kxs + kx, -1)
        order = torch.argsort(key)
        uniq, counts = torch.unique_consecutive(key[order], return_counts=True)
        s = 0
        for u, c in zip(uniq.tolist(), counts.tolist()):
            sel_all = order[s : s + c]
            s += c
            if u < 0:
                continue
            Ky, Kx = divmod(u, kxs)
            step = max(1, BLOCK // (P * Ky * Kx))
            for c0 in range(0, c, step):
                tasks.append(
                    block(rowb, wy, xi, wx, a_rl[:, lvl], s_rl[:, lvl], sel_all[c0 : c0 + step], Ky, Kx)
                )
    run(tasks)
    return idx, w, offsets
