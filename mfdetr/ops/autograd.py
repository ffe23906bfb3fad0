"""The autograd Functions of the fused RoIAlign (``roi_align.py``) and the tap lists of one call.

- ``FusedRoIAlign``: features (any layout/dtype) -> gathered rows; backward writes each level's gradient
  in the level's own memory format;
- ``Plan`` / ``build``: a call's rois and options, and their tap lists (``taps.build_taps``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mfdetr.ops import parallel, taps
from mfdetr.ops.gather import cell_range, flatten_into, gather_rows, row_chunks, transposed_gather
from mfdetr.ops.taps import LevelShape

# ----------------------------------------------------------------------------------------------------
# the taps of a call


@dataclass(frozen=True)
class Plan:
    """One call's rois and options: what its taps depend on (``taps.build_taps``'s arguments)."""

    rois: Tensor
    scales: list[float]
    out_hw: tuple[int, int]
    sampling_ratio: int
    aligned: bool
    per_level: bool
    ct: torch.dtype


def build(plan: Plan, shapes: Sequence[LevelShape], workers: int):
    with parallel.serial():
        return taps.build_taps(
            plan.rois,
            shapes,
            plan.scales,
            plan.out_hw,
            plan.sampling_ratio,
            plan.aligned,
            plan.per_level,
            plan.ct,
            lambda tasks: parallel.run_tasks(tasks, workers),
        )


# ----------------------------------------------------------------------------------------------------
# autograd


def serial_backward(fn: Callable[..., Any]) -> Any:
    """An autograd Function's ``backward`` (a staticmethod) that runs ``fn`` with stray ATen ops
    single-threaded: the big steps use the task pool."""

    @functools.wraps(fn)
    def backward(ctx: Any, *grads: Tensor) -> Any:
        with parallel.serial():
            return fn(ctx, *grads)

    return staticmethod(backward)


class FusedRoIAlign(torch.autograd.Function):
    """features (any layout/dtype) -> gathered rows [nbags, C] (compute dtype)."""

    @staticmethod
    def forward(ctx, plan: Plan, *features: Tensor) -> Tensor:  # type: ignore[override]
        # stray ATen ops single-threaded too (the big steps use the task pool); no autocast inside: the
        # taps and the gather are float32 by design, whatever autocast region (bf16 training) calls us
        with parallel.serial(), no_autocast(features[0].device):
            return FusedRoIAlign._forward(ctx, plan, *features)

    @staticmethod
    def _forward(ctx, plan: Plan, *features: Tensor) -> Tensor:
        f0 = features[0]
        ct, dev = plan.ct, f0.device
        shapes = [(int(f.shape[0]), int(f.shape[2]), int(f.shape[3])) for f in features]
        C = int(f0.shape[1])
        workers = parallel.n_workers(dev)
        n_rows = sum(b * h * w for b, h, w in shapes)
        ws = parallel.take_workspace(n_rows * C, ct, dev)
        try:
            buf = (
                ws[: n_rows * C].view(n_rows, C)
                if ws is not None
                else torch.empty((n_rows, C), dtype=ct, device=dev)
            )
            flatten_into(buf, features, workers)
            idx, w, offsets = build(plan, shapes, workers)
            rows = gather_rows(buf, idx, w, offsets, workers)
            del buf
        finally:
            parallel.return_workspace(ws)
        ctx.save_for_backward(idx, w, offsets)
        ctx.meta = (shapes, C, [f.dtype for f in features], [_layout(f) for f in features])
        return rows

    @serial_backward
    def backward(ctx, grad_rows: Tensor):  # type: ignore[override]
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
        chunks = [c for c in row_chunks(shapes, C, 4, dev) if needs[c[0]]]
        ranges = [cell_range(c, shapes) for c in chunks]

        def write(j: int, rows: Tensor) -> None:
            lvl, _, b0, b1, y0, y1 = chunks[j]
            _, H, W = shapes[lvl]
            nb, h = b1 - b0, y1 - y0
            dst = grads[lvl][b0:b1, :, y0:y1, :]
            if layouts[lvl] == torch.channels_last:
                dst.permute(0, 2, 3, 1).copy_(rows.view(nb, h, W, C))
            else:  # contiguous NCHW: a batched 2-D transpose
                dst.flatten(2).copy_(rows.view(nb, h * W, C).transpose(1, 2))

        workers = parallel.n_workers(dev)
        n_rows = sum(b * h * w_ for b, h, w_ in shapes)
        if idx.numel() == 0:
            for j, (c0, c1) in enumerate(ranges):
                write(j, grad_rows.new_zeros((c1 - c0, C)))
        else:
            transposed_gather(grad_rows.contiguous(), idx, w, offsets, n_rows, ranges, write, workers)
        return (None, *grads)


def no_autocast(device: torch.device):
    """Autocast off on ``device``'s type for the enclosed ops (a no-op context when it is off)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _layout(f: Tensor) -> torch.memory_format:
    """The memory format of a level's gradient: channels-last if the level is, else NCHW."""
    if not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
