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
2. Tap lists (``taps.py``): per bin, the buffer rows and weights of all its bilinear samples over all
   levels, the samples of a row/column merged (separable weights), as one bag of an
   ``F.embedding_bag(mode="sum", per_sample_weights=...)``: one vectorised gather writes the level sum
   directly, with no per-level outputs.
3. Backward: the transposed gather. The taps are sorted by buffer row once; then one bag per buffer
   row, gathered from the output gradient, gives the features' gradient (no atomics, no scatter of
   ``[taps, C]`` rows), written straight into each level's gradient in its own memory format.
4. CPU (``parallel.py``): the many small ops run single-threaded; the large steps (level copy, tap
   building, transposed sort and gathers) are split into independent chunks run by up to
   ``torch.get_num_threads()`` threads (fewer when the machine is busy), each running single-threaded
   ATen ops: one join per step instead of an OpenMP fork/join per op, which costs a scheduler time
   slice when the cores are shared. The forward gather is one multi-threaded ``embedding_bag``. The
   level copy goes to a workspace reused across calls, and the backward writes the features'
   gradients chunk by chunk from small (recycled) chunk results: fresh memory page-faults.

The result is a channels-last view ``[R, C, Sh, Sw]`` (``[R, L, C, Sh, Sw]`` with ``per_level``) of the
gathered ``[R, Sh, Sw, C]`` rows; ``.contiguous()`` gives NCHW memory.

Backends (``backend=`` of ``multilevel_roi_align``, else env ``MFDETR_ROI_ALIGN_BACKEND``, else ``auto``):
``fused`` (the above), ``torchvision`` (torchvision's kernel once per level in the compute dtype, summed:
the reference definition, which may be faster on CUDA where torchvision has a native kernel), ``auto``
(``fused`` on the CPU, ``AUTO_BACKEND_CUDA`` on CUDA; ``benchmarks/gpu_suite.py`` times both). Output and
gradients agree either way (up to float rounding); only the result's memory layout differs.

Files: this module holds the argument checks, the torchvision backend (the definition), the backend
choice and the public API; the buffer copy and the gathers (forward and transposed) are in
``gather.py``, the autograd Functions in ``autograd.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from mfdetr.errors import MfdetrError
from mfdetr.ops import taps
from mfdetr.ops.autograd import FusedRoIAlign, Plan
from mfdetr.ops.parallel import release_workspace

__all__ = [
    "BACKENDS",
    "multilevel_roi_align",
    "release_workspace",
    "resolve_backend",
]

BACKENDS = ("auto", "fused", "torchvision")
BACKEND_ENV = "MFDETR_ROI_ALIGN_BACKEND"
# what ``auto`` runs on CUDA: set from benchmarks/gpu_suite.py's roi_align rows (fused vs torchvision)
AUTO_BACKEND_CUDA = "fused"


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


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend a call on ``device`` runs: ``backend``, else env ``MFDETR_ROI_ALIGN_BACKEND``, else
    ``auto``; ``auto`` is ``fused`` on the CPU and ``AUTO_BACKEND_CUDA`` on CUDA."""
    name = backend
    if name is None:
        name = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        if name not in BACKENDS:
            raise MfdetrError(
                f"environment variable {BACKEND_ENV}={name!r}: use one of {', '.join(BACKENDS)}"
            )
    elif name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if name == "auto":
        name = AUTO_BACKEND_CUDA if torch.device(device).type == "cuda" else "fused"
    return name


def _torchvision_sum(
    features: Sequence[Tensor],
    r: Tensor,
    scales: Sequence[float],
    out_hw: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    per_level: bool,
    ct: torch.dtype,
) -> Tensor:
    """The ``torchvision`` backend: torchvision's kernel per level in the compute dtype, summed
    (differentiable through ``.to(ct)``: bf16/fp16 levels get their gradients in their own dtype)."""
    from torchvision.ops import roi_align as tv_roi_align

    outs = [
        tv_roi_align(f.to(ct), r, out_hw, float(s), sampling_ratio, aligned) for f, s in zip(features, scales)
    ]
    if per_level:
        return torch.stack(outs, dim=1)
    out = outs[0]
    for o in outs[1:]:
        out = out + o
    return out


# ----------------------------------------------------------------------------------------------------
# public API


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
    except taps.TooManyTaps:
        R = rois.shape[0]
        if R < 2:
            raise ValueError(
                "one roi needs more than 2**31 taps (a huge box with adaptive sampling?)"
            ) from None
        return torch.cat([_split_rois(fn, rois[: R // 2]), _split_rois(fn, rois[R // 2 :])], dim=0)


def multilevel_roi_align(
    features: Sequence[Tensor],
    rois: Tensor | Sequence[Tensor],
    spatial_scales: Sequence[float],
    output_size: int | tuple[int, int],
    sampling_ratio: int = -1,
    aligned: bool = True,
    per_level: bool = False,
    backend: str | None = None,
) -> Tensor:
    """RoIAlign of every roi from every level: [R,C,Sh,Sw] summed over levels, or [R,L,C,Sh,Sw].

    ``features``: per level [B,C,H,W] (same B, C, dtype: float32/64, bf16, fp16; any memory layout);
    ``rois``: [R,5] (batch index, x1, y1, x2, y2) in the input frame, or a list of per-image [R_b,4]
    boxes; ``spatial_scales``: per level (1/stride). Equal to summing ``torchvision.ops.roi_align(
    features[l], rois, output_size, spatial_scales[l], sampling_ratio, aligned)`` over the levels
    (float32 accumulation for bf16/fp16; keep the rois float32). Differentiable w.r.t. the features
    (not the rois); each level's gradient has the level's memory format. The result has the features'
    dtype and is a channels-last view (``.contiguous()`` gives NCHW memory; NCHW already with the
    ``torchvision`` backend). ``backend``: ``auto`` | ``fused`` | ``torchvision`` (see the module doc;
    None = env ``MFDETR_ROI_ALIGN_BACKEND``, else ``auto``).
    """
    _check_features(features, spatial_scales)
    dtype = features[0].dtype
    ct = _compute_dtype(dtype)
    out_hw = _pair(output_size)
    r_all = _as_rois(rois, ct, features[0].device)
    L = len(features)
    if resolve_backend(backend, features[0].device) == "torchvision":
        out = _torchvision_sum(
            features, r_all, spatial_scales, out_hw, int(sampling_ratio), bool(aligned), per_level, ct
        )
        return out if out.dtype == dtype else out.to(dtype)

    plan = Plan(r_all, list(spatial_scales), out_hw, int(sampling_ratio), bool(aligned), per_level, ct)

    def run(r: Tensor) -> Tensor:
        rows = FusedRoIAlign.apply(replace(plan, rois=r), *features)
        return _shape_rows(rows, r.shape[0], L, out_hw, per_level)

    out = _split_rois(run, r_all)
    return out if out.dtype == dtype else out.to(dtype)
