"""The level buffer and the gathers over it, for the fused RoIAlign (``roi_align.py``).

- ``flatten_into``: the levels copied into one channels-last buffer ``[sum_l B*H_l*W_l, C]``, in chunks
  (``row_chunks``: level, images, rows) run by the CPU task pool (``parallel.py``);
- ``gather_rows``: the forward, one ``F.embedding_bag(mode="sum", per_sample_weights=...)`` over the tap lists;
- ``transposed_gather``: its transpose (the features' gradient), the taps sorted by buffer row
  (``_Transposed``), one bag per buffer row, no atomics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.ops import parallel
from mfdetr.ops.taps import LevelShape

# ----------------------------------------------------------------------------------------------------
# chunks of the buffer (level, images b0:b1, rows y0:y1), each at most CHUNK_BYTES of rows


def row_chunks(shapes: Sequence[LevelShape], C: int, elem: int, device: torch.device):
    """[(level, row0, b0, b1, y0, y1)]: whole images when an image fits a chunk, else bands of rows."""
    limit = parallel.CHUNK_BYTES if device.type == "cpu" else 1 << 62
    out = []
    row0 = 0
    for lvl, (B, H, W) in enumerate(shapes):
        img = H * W * C * elem
        if B * H * W == 0:
            pass
        elif img <= limit:
            k = max(1, limit // max(img, 1))
            out += [(lvl, row0, b0, min(b0 + k, B), 0, H) for b0 in range(0, B, k)]
        else:
            band = max(1, limit // (W * C * elem))
            out += [
                (lvl, row0, b, b + 1, y0, min(y0 + band, H)) for b in range(B) for y0 in range(0, H, band)
            ]
        row0 += B * H * W
    return out


def cell_range(chunk, shapes) -> tuple[int, int]:
    lvl, row0, b0, b1, y0, y1 = chunk
    _, H, W = shapes[lvl]
    return row0 + b0 * H * W + y0 * W, row0 + (b1 - 1) * H * W + y1 * W


def flatten_into(buf: Tensor, features: Sequence[Tensor], workers: int) -> None:
    """buf[rows of (level, b, y, x), :] = features[level][b, :, y, x]."""
    shapes = [(int(f.shape[0]), int(f.shape[2]), int(f.shape[3])) for f in features]
    C = buf.shape[1]

    def task(chunk):
        lvl, row0, b0, b1, y0, y1 = chunk
        f = features[lvl]
        _, H, W = shapes[lvl]
        c0, c1 = cell_range(chunk, shapes)
        src = f[b0:b1, :, y0:y1, :]
        nb, h = b1 - b0, y1 - y0
        dst = buf[c0:c1]
        if src.stride(3) == 1 and (h == 1 or src.stride(2) == W):  # NCHW rows: batched 2-D transpose
            dst.view(nb, h * W, C).copy_(
                src.as_strided((nb, C, h * W), (src.stride(0), src.stride(1), 1)).transpose(1, 2)
            )
        else:  # channels-last (a plain copy) or other strides
            dst.view(nb, h, W, C).copy_(src.permute(0, 2, 3, 1))

    chunks = row_chunks(shapes, C, buf.element_size(), buf.device)
    parallel.run_tasks([lambda c=c: task(c) for c in chunks], workers)


# ----------------------------------------------------------------------------------------------------
# the gather and its transpose


def gather_rows(buf: Tensor, idx: Tensor, w: Tensor, offsets: Tensor, workers: int) -> Tensor:
    """rows[bag] = sum_{t in bag} w[t] * buf[idx[t]]  -> [nbags, C]: one embedding_bag (its bags are
    split over ``workers`` threads)."""
    if offsets.numel() == 0:
        return buf.new_zeros((0, buf.shape[1]))
    with parallel.threads(workers):
        return F.embedding_bag(idx, buf, offsets, mode="sum", per_sample_weights=w)


class _Transposed:
    """The taps of one range of bags sorted by buffer row: row r's taps are [toff[r], toff[r+1])."""

    def __init__(self, idx: Tensor, w: Tensor, offsets: Tensor, bag0: int, t0: int, t1: int, n_rows: int):
        dev = idx.device
        pidx = idx[t0:t1]
        n = pidx.numel()
        # bag id of every tap = bag0 + #(bags after the first starting at or before it)
        local = offsets.to(torch.int64) - t0
        starts = local[1:]
        starts = starts[starts < n]
        mark = torch.zeros(n, dtype=torch.int32, device=dev)
        mark.scatter_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
        bag = torch.cumsum(mark, 0, dtype=torch.int32).add_(bag0)
        sidx, order = torch.sort(pidx)
        cnt = torch.bincount(sidx, minlength=n_rows)
        del sidx, mark
        toff = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
        torch.cumsum(cnt, 0, out=toff[1:])
        self.bag = bag.index_select(0, order)
        self.w = w[t0:t1].index_select(0, order)
        self.toff = toff

    def gather(self, grad_rows: Tensor, c0: int, c1: int, t0: int, t1: int) -> Tensor:
        return F.embedding_bag(
            self.bag[t0:t1],
            grad_rows,
            (self.toff[c0:c1] - t0).to(torch.int32),
            mode="sum",
            per_sample_weights=self.w[t0:t1],
        )


def transposed_gather(
    grad_rows: Tensor,
    idx: Tensor,
    w: Tensor,
    offsets: Tensor,
    n_rows: int,
    ranges: Sequence[tuple[int, int]],
    write: Callable[[int, Tensor], None],
    workers: int,
) -> None:
    """For each buffer-row range j: write(j, rows) with rows[r] = sum of w[t] * grad_rows[bag(t)] over
    the taps t reading buffer row r. The taps are split into ``workers`` parts (by bags), each sorted
    by its own worker; a range's result sums the parts."""
    nb, T = offsets.numel(), idx.numel()
    n_parts = max(1, min(workers, nb))
    cut = [0]
    if n_parts > 1:
        want = torch.linspace(0, T, n_parts + 1, dtype=torch.float64)[1:-1].round().to(torch.int64)
        cut += sorted(set(torch.searchsorted(offsets.to(torch.int64), want).tolist()) - {0, nb})
    cut.append(nb)
    tcut = torch.cat([offsets.to(torch.int64), offsets.new_tensor([T], dtype=torch.int64)])[cut].tolist()
    parts = parallel.run_tasks(
        [
            lambda i=i: _Transposed(
                idx, w, offsets[cut[i] : cut[i + 1]], cut[i], tcut[i], tcut[i + 1], n_rows
            )
            for i in range(len(cut) - 1)
        ],
        workers,
    )
    bounds = sorted({c for r in ranges for c in r})
    pos = {c: i for i, c in enumerate(bounds)}
    hb = torch.tensor(bounds, dtype=torch.int64, device=idx.device)
    tb = [p.toff[hb].tolist() for p in parts]

    def task(j):
        c0, c1 = ranges[j]
        acc = None
        for p, t in zip(parts, tb):
            o = p.gather(grad_rows, c0, c1, t[pos[c0]], t[pos[c1]])
            acc = o if acc is None else acc.add_(o)
        write(j, acc)

    parallel.run_tasks([lambda j=j: task(j) for j in range(len(ranges))], workers)
