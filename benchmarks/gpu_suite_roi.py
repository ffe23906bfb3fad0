"""gpu_suite section (a): the fused RoIAlign vs torchvision's per-level sum, on the suite's device.

Inputs as ``benchmarks/roi_align.py``: 4 levels at strides 8/16/32/64, boxes with log-uniform sides in
16..600 px (scaled with the image in ``--quick``), ``aligned=True``, adaptive sampling. Equality: both
backends vs the definition in float64 (torchvision per level on float64 copies, summed), values and
the features' gradients for one fixed upstream gradient, max error relative to the reference's max.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from gpu_suite import Context, finite, time_runs

from mfdetr.ops import multilevel_roi_align

STRIDES = (8, 16, 32, 64)
BACKENDS = ("fused", "torchvision")
# max |ours - reference| / max |reference|: float32 differs only in summation order; bf16 results are
# rounded from (nearly) the same float32 value, so they may differ by one bf16 ulp (2**-8 relative)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}


def make_inputs(
    h: int,
    w: int,
    batch: int,
    per_image: int,
    channels: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, channels, math.ceil(h / s), math.ceil(w / s), generator=g) for s in STRIDES]
    n = batch * per_image
    lo, hi = math.log(16.0 * min(h, w) / 800), math.log(600.0 * min(h, w) / 800)
    bw = torch.empty(n).uniform_(lo, hi, generator=g).exp().clamp(max=w - 1)
    bh = torch.empty(n).uniform_(lo, hi, generator=g).exp().clamp(max=h - 1)
    x1 = torch.rand(n, generator=g) * (w - bw)
    y1 = torch.rand(n, generator=g) * (h - bh)
    bidx = torch.arange(batch).repeat_interleave(per_image).float()
    rois = torch.stack([bidx, x1, y1, x1 + bw, y1 + bh], dim=1)
    return [f.to(device=device, dtype=dtype) for f in feats], rois.to(device)


def _fwd_bwd(fn, feats: list[torch.Tensor], grad: torch.Tensor | None):
    leaf = [f.detach().clone().requires_grad_() for f in feats]
    out = fn(leaf)
    g = (
        grad
        if grad is not None
        else torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    )
    out.backward(g)
    return out.detach(), [f.grad for f in leaf], g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-12)


def equality_rows(name: str, feats, rois, size: int) -> list[dict[str, Any]]:
    scales = [1.0 / s for s in STRIDES]
    ref_out, ref_grads, g = _fwd_bwd(
        lambda fs: multilevel_roi_align(
            [f.double() for f in fs], rois.double(), scales, size, backend="torchvision"
        ),
        feats,
        None,
    )
    rows = []
    for backend in BACKENDS:

        def fn(fs, b=backend):
            return multilevel_roi_align(fs, rois, scales, size, backend=b)

        out, grads, _ = _fwd_bwd(fn, feats, g)
        e_out = _rel(out, ref_out)
        e_grad = max(_rel(a, b) for a, b in zip(grads, ref_grads))
        tol = TOL[feats[0].dtype]
        rows.append(
            {
                "name": f"equal {backend} {str(feats[0].dtype)[6:]} {name}",
                "max_rel_err_out": e_out,
                "max_rel_err_grad": e_grad,
                "tol": tol,
                "equal": bool(e_out <= tol and e_grad <= tol),
                "grad_dtype_ok": all(x.dtype == feats[0].dtype for x in grads),
                "ok": bool(e_out <= tol and e_grad <= tol and finite(e_out, e_grad)),
            }
        )
    return rows


def timing_row(ctx: Context, name: str, feats, rois, size: int, mode: str) -> dict[str, Any]:
    scales = [1.0 / s for s in STRIDES]
    prof = ctx.prof
    res: dict[str, list[float]] = {}
    for backend in BACKENDS:

        def fn_fwd(b=backend):
            with torch.no_grad():
                return multilevel_roi_align(feats, rois, scales, size, backend=b)

        if mode == "fwd":
            fn = fn_fwd
        else:
            leaf = [f.detach().clone().requires_grad_() for f in feats]
            g = torch.randn_like(fn_fwd().contiguous())

            def fn(b=backend, leaf=leaf, g=g):
                for f in leaf:
                    f.grad = None
                multilevel_roi_align(leaf, rois, scales, size, backend=b).backward(g)

        res[backend] = time_runs(fn, ctx.device, prof.roi_runs, prof.roi_warmup, ctx.budget)
    med = {b: statistics.median(ts) for b, ts in res.items()}
    row = {"name": f"time {mode} {str(feats[0].dtype)[6:]} {name}"}
    for b in BACKENDS:
        row[f"{b}_ms_median"] = 1e3 * med[b]
        row[f"{b}_ms_min"] = 1e3 * min(res[b])
    row["runs"] = min(len(v) for v in res.values())
    row["fused_speedup"] = med["torchvision"] / max(med["fused"], 1e-12)
    row["faster"] = min(med, key=med.get)
    row["ok"] = finite(*med.values())
    return row


def section(ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, (name, h, w, batch, per_image, size, channels) in enumerate(ctx.prof.roi_sizes):
        for dtype in (torch.float32, torch.bfloat16):
            feats, rois = make_inputs(h, w, batch, per_image, channels, ctx.device, dtype)
            if i in (0, len(ctx.prof.roi_sizes) - 1):  # equality on the smallest and the largest size
                rows += equality_rows(name, feats, rois, size)
            for mode in ("fwd", "fwd+bwd"):
                rows.append(timing_row(ctx, name, feats, rois, size, mode))
            del feats
    rows.append(auto_pick(ctx.device, rows))
    return rows


def auto_pick(device: torch.device, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which backend ``auto`` should run on this device: the faster in the sum of the fwd+bwd medians."""
    tot = {
        b: sum(r.get(f"{b}_ms_median", 0.0) for r in rows if r["name"].startswith("time fwd+bwd"))
        for b in BACKENDS
    }
    from mfdetr.ops.roi_align import resolve_backend

    pick = min(tot, key=tot.get)
    return {
        "name": f"auto backend on {device.type}",
        "fwd_bwd_total_ms_fused": tot["fused"],
        "fwd_bwd_total_ms_torchvision": tot["torchvision"],
        "measured_faster": pick,
        "auto_now": resolve_backend("auto", device),
        "ok": finite(*tot.values()),
    }
