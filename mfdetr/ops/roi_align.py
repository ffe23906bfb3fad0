"""Fused multi-level RoIAlign (see docs/DESIGN.md, "Fused RoIAlign").

``multilevel_roi_align(features, rois, spatial_scales, output_size, sampling_ratio, aligned, per_level)``
equals ``sum_l torchvision.ops.roi_align(features[l], rois, output_size, spatial_scales[l],
sampling_ratio, aligned)`` (or the per-level results stacked on dim 1), including torchvision's border
rules (a sample at y < -1 or y > H is 0, else clamped) and its adaptive sampling (``sampling_ratio <=
0``: ``ceil(roi_size / output_size)`` samples per bin and axis, per roi and per level), and is
differentiable w.r.t. the features.

Design (pure torch; the same code runs on any device, the CPU path adds chunking and threads):

1. The levels are copied once into one channels-last buffer ``[sum_l B*H_l*W_l, C]`` (float32 for
   bf16/fp16 inputs: all accumulation is in float32).
2. Tap lists (``_taps.py``): per bin, the buffer rows and weights of all its bilinear samples over all
   levels, the samples of a row/column merged (separable weights), as one bag of an
   ``F.embedding_bag(mode="sum", per_sample_weights=...)``: one vectorised gather writes the level sum
   directly, with no per-level outputs.
3. Backward: the transposed gather. The taps are sorted by buffer row once; then one bag per buffer
   row, gathered from the output gradient, gives the features' gradient (no atomics, no scatter of
   ``[taps, C]`` rows), written straight into each level's gradient in its own memory format.
4. CPU (``_cpu.py``): the many small ops run single-threaded; the large steps (level copy, tap
   building, transposed sort and gathers) are split into independent chunks run by up to
   ``torch.get_num_threads()`` threads (fewer when the machine is busy), each running single-threaded
   ATen ops: one join per step instead of an OpenMP fork/join per op, which costs a scheduler time
   slice when the cores are shared. The forward gather is one multi-threaded ``embedding_bag``. The
   level copy goes to a workspace reused across calls, and the backward writes the features'
   gradients chunk by chunk from small (recycled) chunk results: fresh memory page-faults.

The result is a channels-last view ``[R, C, Sh, Sw]`` (``[R, L, C, Sh, Sw]`` with ``per_level``) of the
gathered ``[R, Sh, Sw, C]`` rows; ``.contiguous()`` gives NCHW memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.ops import _cpu, _taps
from mfdetr.ops._cpu import release_workspace
from mfdetr.ops._taps import LevelShape

__all__ = [
    "flatten_levels",
    "multilevel_roi_align",
    "multilevel_roi_align_flat",
    "multilevel_roi_align_reference",
    "release_workspace",
]


# ----------------------------------------------------------------------------------------------------
# arguments


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        sh = sw = output_size
    else:
        sh, sw = (int(v) for v in output_size)
    if sh <= 0 or sw <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    return int(sh), int(sw)


def _as_rois(rois: Tensor | Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[R,5] (batch index, x1, y1, x2, y2) from an [R,5] tensor or a list of per-image [R_b,4] boxes."""
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must be [R,5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
        return rois.detach().to(device=device, dtype=dtype)
    parts = []
    for b, boxes in enumerate(rois):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes of image {b} must be [R_b,4], got {tuple(boxes.shape)}")
        boxes = boxes.detach().to(device=device, dtype=dtype)
        parts.append(torch.cat([boxes.new_full((boxes.shape[0], 1), float(b)), boxes], dim=1))
    if not parts:
        return torch.zeros((0, 5), dtype=dtype, device=device)
    return torch.cat(parts, dim=0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_features(features: Sequence[Tensor], spatial_scales: Sequence[float]) -> None:
    if len(features) == 0:
        raise ValueError("need at least one feature level")
    if len(features) != len(spatial_scales):
        raise ValueError(f"{len(features)} feature levels but {len(spatial_scales)} spatial scales")
    f0 = features[0]
    for i, f in enumerate(features):
        if f.dim() != 4:
            raise ValueError(f"features[{i}] must be [B,C,H,W], got {tuple(f.shape)}")
        if f.shape[:2] != f0.shape[:2] or f.dtype != f0.dtype or f.device != f0.device:
            raise ValueError("all feature levels must share B, C, dtype and device")
        if not f.is_floating_point():
            raise ValueError(f"features must be floating point, got {f.dtype}")


# ----------------------------------------------------------------------------------------------------
# the definition


def multilevel_roi_align_reference(
    features: Sequence[Tensor],
    rois: Tensor | Sequence[Tensor],
    spatial_scales: Sequence[float],
    output_size: int | tuple[int, int],
    sampling_ratio: int = -1,
    aligned: bool = True,
    per_level: bool = False,
) -> Tensor:
    """The definition: torchvision ``roi_align`` once per level, summed (or stacked on dim 1).

    Computed in float32 for bf16/fp16 inputs (cast back at the end).
    """
    from torchvision.ops import roi_align as tv_roi_align

    _check_features(features, spatial_scales)
    f0 = features[0]
    ct = _compute_dtype(f0.dtype)
    r = _as_rois(rois, ct, f0.device)
    size = _pair(output_size)
    outs = [
        tv_roi_align(f.to(ct), r, size, float(s), sampling_ratio, aligned)
        for f, s in zip(features, spatial_scales)
    ]
    out = torch.stack(outs, dim=1) if per_level else torch.stack(outs, dim=0).sum(dim=0)
    return out.to(f0.dtype)


# ----------------------------------------------------------------------------------------------------
# chunks of the buffer (level, images b0:b1, rows y0:y1), each at most CHUNK_BYTES of rows


def _row_chunks(shapes: Sequence[LevelShape], C: int, elem: int, device: torch.device):
    """[(level, row0, b0, b1, y0, y1)]: whole images when an image fits a chunk, else bands of rows."""
    limit = _cpu.CHUNK_BYTES if device.type == "cpu" else 1 << 62
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
            out += [(lvl, row0, b, b + 1, y0, min(y0 + band, H)) for b in range(B) for y0 in range(0, H, band)]
        row0 += B * H * W
    return out


def _cell_range(chunk, shapes) -> tuple[int, int]:
    lvl, row0, b0, b1, y0, y1 = chunk
    _, H, W = shapes[lvl]
    return row0 + b0 * H * W + y0 * W, row0 + (b1 - 1) * H * W + y1 * W


def _flatten_into(buf: Tensor, features: Sequence[Tensor], workers: int) -> None:
    """buf[rows of (level, b, y, x), :] = features[level][b, :, y, x]."""
    shapes = [(int(f.shape[0]), int(f.shape[2]), int(f.shape[3])) for f in features]
    C = buf.shape[1]

    def task(chunk):
        lvl, row0, b0, b1, y0, y1 = chunk
        f = features[lvl]
        _, H, W = shapes[lvl]
        c0, c1 = _cell_range(chunk, shapes)
        src = f[b0:b1, :, y0:y1, :]
        nb, h = b1 - b0, y1 - y0
        dst = buf[c0:c1]
        if src.stride(3) == 1 and (h == 1 or src.stride(2) == W):  # NCHW rows: batched 2-D transpose
            dst.view(nb, h * W, C).copy_(src.as_strided((nb, C, h * W), (src.stride(0), src.stride(1), 1)).transpose(1, 2))
        else:  # channels-last (a plain copy) or other strides
            dst.view(nb, h, W, C).copy_(src.permute(0, 2, 3, 1))

    chunks = _row_chunks(shapes, C, buf.element_size(), buf.device)
    _cpu.run_tasks([lambda c=c: task(c) for c in chunks], workers)


# ----------------------------------------------------------------------------------------------------
# the gather and its transpose


def _gather(buf: Tensor, idx: Tensor, w: Tensor, offsets: Tensor, workers: int) -> Tensor:
    """rows[bag] = sum_{t in bag} w[t] * buf[idx[t]]  -> [nbags, C]: one embedding_bag (its bags are
    split over ``workers`` threads)."""
    if offsets.numel() == 0:
        return buf.new_zeros((0, buf.shape[1]))
    with _cpu.threads(workers):
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
            self.bag[t0:t1], grad_rows, (self.toff[c0:c1] - t0).to(torch.int32), mode="sum", per_sample_weights=self.w[t0:t1]
        )


def _transposed_gather(
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
    parts = _cpu.run_tasks(
        [
            lambda i=i: _Transposed(idx, w, offsets[cut[i] : cut[i + 1]], cut[i], tcut[i], tcut[i + 1], n_rows)
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

    _cpu.run_tasks([lambda j=j: task(j) for j in range(len(ranges))], workers)


# ----------------------------------------------------------------------------------------------------
# autograd


class _FusedRoIAlign(torch.autograd.Function):
    """features (any layout/dtype) -> gathered rows [nbags, C] (compute dtype)."""

    @staticmethod
    def forward(ctx, plan: dict, *features: Tensor) -> Tensor:  # type: ignore[override]
        with _cpu.serial():  # stray ATen ops single-threaded too; the big steps use the task pool
            return _FusedRoIAlign._forward(ctx, plan, *features)

    @staticmethod
    def _forward(ctx, plan: dict, *features: Tensor) -> Tensor:
        f0 = features[0]
        ct, dev = plan["ct"], f0.device
        shapes = [(int(f.shape[0]), int(f.shape[2]), int(f.shape[3])) for f in features]
        C = int(f0.shape[1])
        workers = _cpu.n_workers(dev)
        n_rows = sum(b * h * w for b, h, w in shapes)
        ws = _cpu.take_workspace(n_rows * C, ct, dev)
        try:
            buf = ws[: n_rows * C].view(n_rows, C) if ws is not None else torch.empty((n_rows, C), dtype=ct, device=dev)
            _flatten_into(buf, features, workers)
            idx, w, offsets = _build(plan, shapes, workers)
            rows = _gather(buf, idx, w, offsets, workers)
            del buf
        finally:
            _cpu.return_workspace(ws)
        ctx.save_for_backward(idx, w, offsets)
        ctx.meta = (shapes, C, [f.dtype for f in features], [_layout(f) for f in features])
        return rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor):  # type: ignore[override]
        with _cpu.serial():
            return _FusedRoIAlign._backward(ctx, grad_rows)

    @staticmethod
    def _backward(ctx, grad_rows: Tensor):
        idx, w, offsets = ctx.saved_tensors
        shapes, C, dtypes, layouts = ctx.meta
        needs = ctx.needs_input_grad[1:]
        dev = grad_rows.device
        grads = [
            (torch.empty((b, C, h, w_), dtype=dt, device=dev, memory_format=lay) if need else None)
            for (b, h, w_), dt, lay, need in zip(shapes, dtypes, layouts, needs)
        ]
        if not any(needs):
            return (None, *grads)
        chunks = [c for c in _row_chunks(shapes, C, 4, dev) if needs[c[0]]]
        ranges = [_cell_range(c, shapes) for c in chunks]

        def write(j: int, rows: Tensor) -> None:
            lvl, _, b0, b1, y0, y1 = chunks[j]
            _, H, W = shapes[lvl]
            nb, h = b1 - b0, y1 - y0
            dst = grads[lvl][b0:b1, :, y0:y1, :]
            if layouts[lvl] == torch.channels_last:
                dst.permute(0, 2, 3, 1).copy_(rows.view(nb, h, W, C))
            else:  # contiguous NCHW: a batched 2-D transpose
                dst.flatten(2).copy_(rows.view(nb, h * W, C).transpose(1, 2))

        workers = _cpu.n_workers(dev)
        n_rows = sum(b * h * w_ for b, h, w_ in shapes)
        if idx.numel() == 0:
            for j, (c0, c1) in enumerate(ranges):
                write(j, grad_rows.new_zeros((c1 - c0, C)))
        else:
            _transposed_gather(grad_rows.contiguous(), idx, w, offsets, n_rows, ranges, write, workers)
        return (None, *grads)


def _layout(f: Tensor) -> torch.memory_format:
    """The memory format of a level's gradient: channels-last if the level is, else NCHW."""
    if not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _WeightedGather(torch.autograd.Function):
    """Flat API: buffer [N, C] -> rows [nbags, C]; backward: the transposed gather."""

    @staticmethod
    def forward(ctx, buf: Tensor, idx: Tensor, w: Tensor, offsets: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx, w, offsets)
        ctx.n_rows = buf.shape[0]
        with _cpu.serial():
            return _gather(buf, idx, w, offsets, _cpu.n_workers(buf.device))

    @staticmethod
    def backward(ctx, grad_rows: Tensor):  # type: ignore[override]
        with _cpu.serial():
            return _WeightedGather._backward(ctx, grad_rows)

    @staticmethod
    def _backward(ctx, grad_rows: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        idx, w, offsets = ctx.saved_tensors
        n_rows, C = ctx.n_rows, grad_rows.shape[1]
        dev = grad_rows.device
        gbuf = torch.empty((n_rows, C), dtype=grad_rows.dtype, device=dev)
        if idx.numel() == 0:
            gbuf.zero_()
            return gbuf, None, None, None
        step = max(1, _cpu.CHUNK_BYTES // (C * gbuf.element_size())) if dev.type == "cpu" else n_rows
        ranges = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]

        def write(j: int, rows: Tensor) -> None:
            gbuf[ranges[j][0] : ranges[j][1]].copy_(rows)

        _transposed_gather(grad_rows.contiguous(), idx, w, offsets, n_rows, ranges, write, _cpu.n_workers(dev))
        return gbuf, None, None, None


class _FlattenLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype: torch.dtype, *features: Tensor) -> Tensor:  # type: ignore[override]
        B, C = features[0].shape[:2]
        n_rows = sum(B * f.shape[2] * f.shape[3] for f in features)
        buf = torch.empty((n_rows, C), dtype=dtype, device=features[0].device)
        with _cpu.serial():
            _flatten_into(buf, features, _cpu.n_workers(buf.device))
        ctx.meta = [(tuple(f.shape), f.dtype) for f in features]
        return buf

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grads = []
        o = 0
        for ((B, C, H, W), dt), need in zip(ctx.meta, ctx.needs_input_grad[1:]):
            n = B * H * W
            grads.append(grad[o : o + n].view(B, H, W, C).permute(0, 3, 1, 2).to(dt) if need else None)
            o += n
        return (None, *grads)


# ----------------------------------------------------------------------------------------------------
# public API


def _build(plan: dict, shapes: Sequence[LevelShape], workers: int):
    with _cpu.serial():
        return _taps.build_taps(
            plan["rois"],
            shapes,
            plan["scales"],
            plan["out_hw"],
            plan["sampling_ratio"],
            plan["aligned"],
            plan["per_level"],
            plan["ct"],
            lambda tasks: _cpu.run_tasks(tasks, workers),
        )


def _shape_rows(rows: Tensor, R: int, L: int, out_hw: tuple[int, int], per_level: bool) -> Tensor:
    Sh, Sw = out_hw
    C = rows.shape[1]
    if per_level:
        return rows.view(R, L, Sh, Sw, C).permute(0, 1, 4, 2, 3)
    return rows.view(R, Sh, Sw, C).permute(0, 3, 1, 2)


def _split_rois(fn: Callable[[Tensor], Tensor], rois: Tensor) -> Tensor:
    """fn(rois), in halves of the rois if their taps overflow int32 (billions of taps: rare)."""
    try:
        return fn(rois)
    except _taps.TooManyTaps:
        R = rois.shape[0]
        if R < 2:
            raise ValueError("one roi needs more than 2**31 taps (a huge box with adaptive sampling?)") from None
        return torch.cat([_split_rois(fn, rois[: R // 2]), _split_rois(fn, rois[R // 2 :])], dim=0)


def flatten_levels(features: Sequence[Tensor], dtype: torch.dtype | None = None) -> tuple[Tensor, list[LevelShape]]:
    """Copy per-level maps ``[B,C,H_l,W_l]`` into one channels-last buffer ``[sum_l B*H_l*W_l, C]``.

    Row of (level l, image b, y, x) = ``sum_{l'<l} B*H_l'*W_l' + (b*H_l + y)*W_l + x``. Differentiable.
    ``dtype`` defaults to float64 for float64 features, else float32 (bf16/fp16 accumulate in float32).
    Returns ``(buffer, [(B, H_l, W_l), ...])`` for ``multilevel_roi_align_flat``.
    """
    dtype = dtype or _compute_dtype(features[0].dtype)
    shapes = [(int(f.shape[0]), int(f.shape[2]), int(f.shape[3])) for f in features]
    return _FlattenLevels.apply(dtype, *features), shapes


def multilevel_roi_align_flat(
    buffer: Tensor,
    shapes: Sequence[LevelShape],
    rois: Tensor | Sequence[Tensor],
    spatial_scales: Sequence[float],
    output_size: int | tuple[int, int],
    sampling_ratio: int = -1,
    aligned: bool = True,
    per_level: bool = False,
) -> Tensor:
    """``multilevel_roi_align`` on a channels-last buffer from ``flatten_levels`` (float32/float64).

    Returns ``[R, C, Sh, Sw]`` (``[R, L, C, Sh, Sw]`` with ``per_level``) in ``buffer.dtype``, as a
    channels-last view. Differentiable w.r.t. ``buffer``.
    """
    if buffer.dim() != 2:
        raise ValueError(f"buffer must be [N, C], got {tuple(buffer.shape)}")
    if buffer.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"buffer must be float32 or float64, got {buffer.dtype}")
    if len(shapes) != len(spatial_scales) or not shapes:
        raise ValueError("need one spatial scale per level (and at least one level)")
    if sum(b * h * w for b, h, w in shapes) != buffer.shape[0]:
        raise ValueError("buffer rows do not match the level shapes")
    if buffer.shape[0] >= 2**31:
        raise ValueError("more than 2**31 buffer rows")
    out_hw = _pair(output_size)
    ct = buffer.dtype
    r_all = _as_rois(rois, ct, buffer.device)
    workers = _cpu.n_workers(buffer.device)

    def run(r: Tensor) -> Tensor:
        plan = dict(rois=r, scales=list(spatial_scales), out_hw=out_hw, sampling_ratio=int(sampling_ratio),
                    aligned=bool(aligned), per_level=per_level, ct=ct)
        idx, w, offsets = _build(plan, shapes, workers)
        rows = _WeightedGather.apply(buffer, idx, w, offsets)
        return _shape_rows(rows, r.shape[0], len(shapes), out_hw, per_level)

    return _split_rois(run, r_all)


def multilevel_roi_align(
    features: Sequence[Tensor],
    rois: Tensor | Sequence[Tensor],
    spatial_scales: Sequence[float],
    output_size: int | tuple[int, int],
    sampling_ratio: int = -1,
    aligned: bool = True,
    per_level: bool = False,
) -> Tensor:
    """RoIAlign of every roi from every level: [R,C,Sh,Sw] summed over levels, or [R,L,C,Sh,Sw].

    ``features``: per level [B,C,H,W] (same B, C, dtype: float32/64, bf16, fp16; any memory layout);
    ``rois``: [R,5] (batch index, x1, y1, x2, y2) in the input frame, or a list of per-image [R_b,4]
    boxes; ``spatial_scales``: per level (1/stride). Equal to summing ``torchvision.ops.roi_align(
    features[l], rois, output_size, spatial_scales[l], sampling_ratio, aligned)`` over the levels
    (float32 accumulation for bf16/fp16; keep the rois float32). Differentiable w.r.t. the features
    (not the rois); each level's gradient has the level's memory format. The result has the features'
    dtype and is a channels-last view (``.contiguous()`` gives NCHW memory).
    """
    _check_features(features, spatial_scales)
    dtype = features[0].dtype
    ct = _compute_dtype(dtype)
    out_hw = _pair(output_size)
    r_all = _as_rois(rois, ct, features[0].device)
    L = len(features)

    def run(r: Tensor) -> Tensor:
        plan = dict(rois=r, scales=list(spatial_scales), out_hw=out_hw, sampling_ratio=int(sampling_ratio),
                    aligned=bool(aligned), per_level=per_level, ct=ct)
        rows = _FusedRoIAlign.apply(plan, *features)
        return _shape_rows(rows, r.shape[0], L, out_hw, per_level)

    out = _split_rois(run, r_all)
    return out if out.dtype == dtype else out.to(dtype)
