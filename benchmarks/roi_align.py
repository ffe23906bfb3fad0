"""Fused multi-level RoIAlign (``mfdetr.ops.multilevel_roi_align``) vs the torchvision per-level sum.

Setting (issue 5): 4 levels x 256 channels at strides 8/16/32/64 of an 800 x 1088 input (maps 100x136,
50x68, 25x34, 13x17), float32, ``aligned=True``; boxes with log-uniform sides in 16..600 px, inside
the image; two sizes:

(a) 4 images x 50 boxes, output 14 x 14;
(b) 8 images x 100 boxes, output 32 x 32.

Methods, run alternately (one repeat = every method once, in rotating order), median over repeats:

- ``torchvision sum``: ``sum(torchvision.ops.roi_align(f_l, rois, S, 1/stride_l, sr, True))`` -- the
  definition of the op (same result as ours);
- ``ours``: ``multilevel_roi_align`` (flatten to channels-last included in the time);
- ``MultiScaleRoIAlign`` (reference only): torchvision's FPN pooler assigns every box to ONE level, so
  it is not the same op (it does about 1/4 of the work).

``fwd``: forward only (no grad). ``fwd+bwd``: forward with leaf features that require grad, then
``out.backward(g)`` with a fixed random ``g`` laid out like the output (as a downstream conv's grad
would be), feature grads reset to None every time (so the time includes materialising them as the
features' NCHW ``.grad``).

Run: ``python benchmarks/roi_align.py [--quick] [--sampling-ratio -1] [--sizes a,b] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections import OrderedDict

import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from mfdetr.ops import multilevel_roi_align, parallel

IMG_H, IMG_W = 800, 1088
STRIDES = (8, 16, 32, 64)
SIZES = {"a": (4, 50, 14), "b": (8, 100, 32)}


def make_inputs(batch: int, per_image: int, channels: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(batch, channels, math.ceil(IMG_H / s), math.ceil(IMG_W / s), generator=g) for s in STRIDES
    ]
    n = batch * per_image
    lo, hi = math.log(16.0), math.log(600.0)
    w = torch.empty(n).uniform_(lo, hi, generator=g).exp()
    h = torch.empty(n).uniform_(lo, hi, generator=g).exp()
    x1 = torch.rand(n, generator=g) * (IMG_W - w)
    y1 = torch.rand(n, generator=g) * (IMG_H - h)
    bidx = torch.arange(batch).repeat_interleave(per_image).float()
    rois = torch.stack([bidx, x1, y1, x1 + w, y1 + h], dim=1)
    return feats, rois


def tv_sum(feats, rois, size, sr):
    out = None
    for f, s in zip(feats, STRIDES):
        o = tv_roi_align(f, rois, size, 1.0 / s, sr, True)
        out = o if out is None else out.add_(o)
    return out


def make_methods(feats, rois, size, sr):
    scales = [1.0 / s for s in STRIDES]
    batch = feats[0].shape[0]
    boxes = [rois[rois[:, 0] == b, 1:] for b in range(batch)]
    msra = MultiScaleRoIAlign([str(i) for i in range(len(feats))], size, sr)
    image_shapes = [(IMG_H, IMG_W)] * batch
    return OrderedDict(
        [
            ("torchvision sum", lambda fs: tv_sum(fs, rois, size, sr)),
            ("ours", lambda fs: multilevel_roi_align(fs, rois, scales, size, sr, True)),
            (
                "MultiScaleRoIAlign*",
                lambda fs: msra(dict(zip(map(str, range(len(fs))), fs)), boxes, image_shapes),
            ),
        ]
    )


def time_fwd(fn, feats) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        out = fn(feats)
        dt = time.perf_counter() - t
    del out
    return dt


def time_fwd_bwd(fn, feats, grads: dict, name: str) -> float:
    for f in feats:
        f.grad = None
    t = time.perf_counter()
    out = fn(feats)
    if name not in grads:  # the upstream gradient, laid out like the output; made once, outside the timing
        dt0 = time.perf_counter() - t
        grads[name] = torch.randn_like(out)
        t = time.perf_counter() - dt0
    out.backward(grads[name])
    dt = time.perf_counter() - t
    del out
    for f in feats:
        f.grad = None
    return dt


def run_size(key: str, sr: int, repeats: int, do_bwd: bool, methods_filter=None) -> dict:
    batch, per_image, size = SIZES[key]
    feats, rois = make_inputs(batch, per_image)
    leaf = [f.clone().requires_grad_() for f in feats]
    methods = make_methods(feats, rois, size, sr)
    if methods_filter:
        methods = OrderedDict((k, v) for k, v in methods.items() if k in methods_filter)
    # correctness of the op being timed (same inputs)
    with torch.no_grad():
        ref = methods["torchvision sum"](feats) if "torchvision sum" in methods else None
        if ref is not None and "ours" in methods:
            ours = methods["ours"](feats)
            err = float((ours - ref).abs().max()) / float(max(f.abs().max() for f in feats))
            print(f"  ({key}) max |ours - torchvision sum| / max|x| = {err:.2e}")
            del ours
        del ref
    names = list(methods)
    res = {(n, m): [] for n in names for m in ("fwd", "fwd+bwd")}
    grads: dict = {}
    for n in names:  # warm-up (allocator, lazy init) and the upstream grads
        time_fwd(methods[n], feats)
        if do_bwd:
            time_fwd_bwd(methods[n], leaf, grads, n)
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for n in order:
            res[(n, "fwd")].append(time_fwd(methods[n], feats))
        if do_bwd:
            for n in order:
                res[(n, "fwd+bwd")].append(time_fwd_bwd(methods[n], leaf, grads, n))
        print(f"  ({key}) repeat {rep + 1}/{repeats} done", flush=True)
    return {k: v for k, v in res.items() if v}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3 for (a), 1 for (b))")
    ap.add_argument("--sampling-ratio", type=int, default=-1)
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument(
        "--repeats", type=int, default=None, help="repeats per size (default 7 for (a), 3 for (b))"
    )
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--no-dynamic",
        action="store_true",
        help="ours always uses torch.get_num_threads() threads (no load-based reduction)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_dynamic:
        parallel.DYNAMIC_THREADS = False
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"torch.get_num_threads()={torch.get_num_threads()}, sampling_ratio={args.sampling_ratio}"
    )
    print(
        f"load average at start: {_load()}; ours would use {parallel.n_workers(torch.device('cpu'))} thread(s) now"
    )
    rows = []
    for key in args.sizes.split(","):
        reps = args.repeats or ((3 if key == "a" else 1) if args.quick else (7 if key == "a" else 3))
        res = run_size(key, args.sampling_ratio, reps, not args.no_bwd)
        batch, per_image, size = SIZES[key]
        for mode in ("fwd", "fwd+bwd"):
            if ("torchvision sum", mode) not in res:
                continue
            base = statistics.median(res[("torchvision sum", mode)])
            for n in ("torchvision sum", "ours", "MultiScaleRoIAlign*"):
                if (n, mode) not in res:
                    continue
                ts = res[(n, mode)]
                med = statistics.median(ts)
                rows.append(
                    (
                        f"({key}) {batch}x{per_image} S={size}",
                        mode,
                        n,
                        med * 1e3,
                        min(ts) * 1e3,
                        max(ts) * 1e3,
                        len(ts),
                        base / med,
                    )
                )
    print()
    print(
        f"{'size':<22}{'pass':<9}{'method':<22}{'median ms':>11}{'min':>10}{'max':>10}{'n':>4}{'speed-up':>10}"
    )
    for size, mode, n, med, lo, hi, cnt, ratio in rows:
        print(f"{size:<22}{mode:<9}{n:<22}{med:>11.1f}{lo:>10.1f}{hi:>10.1f}{cnt:>4}{ratio:>9.1f}x")
    print("speed-up = torchvision-sum median / method median. * MultiScaleRoIAlign pools every box from one")
    print("level only (a different, ~4x cheaper op), shown for reference.")
    print(
        f"load average at end: {_load()}; threads ours used per call: {sorted(_USED)} "
        "(fewer than torch.get_num_threads() when the machine is busy, see mfdetr/ops/parallel.py)"
    )


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


_USED: set = set()
_n_workers = parallel.n_workers


def _count_workers(device):
    n = _n_workers(device)
    _USED.add(n)
    return n


parallel.n_workers = _count_workers


if __name__ == "__main__":
    main()
