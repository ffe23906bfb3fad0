"""Evaluation throughput: paste + threshold + RLE of the top-100 masks per image, ours vs naive.

Rows, measured side by side in one run on the same synthetic inputs (box-frame probabilities
``[N, M, M]`` and boxes with detection-like, log-uniform sizes, some crossing the border):

- ``ours, W workers``: :class:`mfdetr.evaluate.coco_results.ResultPool` jobs (each image: per-box
  separable bilinear paste inside the box, threshold, strip RLE) in W processes -- what
  ``mfdetr evaluate`` runs on CPU;
- ``ours, in process``: the same jobs in this process (one core);
- ``naive grid_sample``: every mask sampled over the WHOLE image (``F.grid_sample`` on an ``[N, H, W]``
  grid, detectron2's full-image path), threshold, ``pycocotools.mask.encode`` of the dense masks;
- ``naive interpolate``: every mask upsampled to the whole image with ``F.interpolate`` (the cost of
  full-resolution mask output, as RF-DETR's validation does), threshold, ``mask.encode``;
- ``ours, chunked on <gpu>``: :func:`mfdetr.evaluate.paste.paste_masks_torch` + encode (only with CUDA).

The naive baselines use torch's intra-op threads (all cores). Then the COCOeval time of the resulting
results per evaluator: segm and bbox with pycocotools and faster-coco-eval, and the whole set
``mfdetr evaluate`` runs by default (segm, bbox, boundary, occluded; :func:`evaluate_results`).
Run: ``python benchmarks/eval_speed.py [--images 40] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from mfdetr.evaluate.coco_eval import evaluate_results, run_cocoeval
from mfdetr.evaluate.coco_results import ResultPool, encode_crops, encode_full, image_results
from mfdetr.evaluate.gt import GroundTruth
from mfdetr.evaluate.paste import paste_masks_torch


def make_images(n: int, height: int, width: int, boxes_per_image: int, m: int, seed: int = 0) -> list[dict]:
    """Synthetic jobs: smooth blob probabilities in detection-like boxes."""
    rng = np.random.default_rng(seed)
    c = (np.arange(m) + 0.5) / m * 2 - 1
    r = np.sqrt(c[None, :] ** 2 + c[:, None] ** 2)
    jobs = []
    side = min(height, width)
    for i in range(n):
        w = np.exp(rng.uniform(np.log(0.03 * side), np.log(0.9 * side), boxes_per_image))
        h = np.minimum(w * np.exp(rng.uniform(-0.6, 0.6, boxes_per_image)), 0.95 * height)
        x0 = rng.uniform(-0.1 * w, width - 0.9 * w)
        y0 = rng.uniform(-0.1 * h, height - 0.9 * h)
        boxes = np.stack([x0, y0, x0 + w, y0 + h], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        rad = rng.uniform(0.5, 1.0, (boxes_per_image, 1, 1))
        noise = rng.normal(0, 0.3, (boxes_per_image, m, m))
        probs = 1 / (1 + np.exp(-(8 * (rad - r[None]) + noise)))
        jobs.append(
            {
                "image_id": i + 1,
                "height": height,
                "width": width,
                "boxes": boxes.astype(np.float32),
                "labels": rng.integers(1, 4, boxes_per_image),
                "scores": np.sort(rng.random(boxes_per_image))[::-1].copy(),
                "probs": probs.astype(np.float32),
                "threshold": 0.5,
            }
        )
    return jobs


def run_ours(jobs: list[dict], workers: int, repeats: int = 1) -> tuple[float, list[dict]]:
    """Best of ``repeats`` passes (the machine is shared), workers warmed up outside the timing."""
    best = float("inf")
    with ResultPool(workers) as pool:
        for _ in pool.submit(0, dict(jobs[0])):
            pass
        list(pool.drain())
        for _ in range(repeats):
            results = []
            t0 = time.perf_counter()
            for job in jobs:
                for _, res in pool.submit(job["image_id"], job):
                    results.extend(res)
            for _, res in pool.drain():
                results.extend(res)
            best = min(best, time.perf_counter() - t0)
    return best, results


def naive_grid_sample(job: dict) -> list[dict]:
    h, w = job["height"], job["width"]
    p = torch.from_numpy(job["probs"])[:, None]
    b = torch.from_numpy(job["boxes"]).double()
    n = b.shape[0]
    gy = (
        (torch.arange(h, dtype=torch.float64)[None] + 0.5 - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1
    ).float()
    gx = (
        (torch.arange(w, dtype=torch.float64)[None] + 0.5 - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1
    ).float()
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=3)
    masks = F.grid_sample(p, grid, align_corners=False)[:, 0] >= 0.5
    return encode_full(masks.numpy())


def naive_interpolate(job: dict) -> list[dict]:
    h, w = job["height"], job["width"]
    p = torch.from_numpy(job["probs"])[:, None]
    masks = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)[:, 0] >= 0.5
    return encode_full(masks.numpy())


def time_naive(fn, jobs: list[dict], repeats: int = 1) -> float:
    fn(jobs[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for job in jobs:
            fn(job)
        best = min(best, time.perf_counter() - t0)
    return best


def time_gpu(jobs: list[dict], device: str) -> float:
    def one(job):
        crops = paste_masks_torch(
            torch.from_numpy(job["probs"]).to(device),
            torch.from_numpy(job["boxes"]).to(device),
            job["height"],
            job["width"],
        )
        return encode_crops(crops, job["height"], job["width"])

    one(jobs[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for job in jobs:
        one(job)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def fake_gt(results: list[dict], jobs: list[dict], gt_per_image: int):
    """A GT set built from some of the masks (so COCOeval does real matching work)."""
    images = [
        {"id": j["image_id"], "height": j["height"], "width": j["width"], "file_name": f"{j['image_id']}.png"}
        for j in jobs
    ]
    anns, seen = [], {}
    for r in results:
        k = seen.get(r["image_id"], 0)
        if k < gt_per_image and k % 2 == 0 or k < gt_per_image // 2:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": r["image_id"],
                    "category_id": r["category_id"],
                    "segmentation": r["segmentation"],
                    "bbox": r["bbox"],
                    "area": r["bbox"][2] * r["bbox"][3],
                    "iscrowd": 0,
                }
            )
        seen[r["image_id"]] = k + 1
    cats = [{"id": c, "name": str(c)} for c in (1, 2, 3)]
    return GroundTruth({"images": images, "annotations": anns, "categories": cats, "info": {}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="images per setting")
    ap.add_argument("--boxes", type=int, default=100, help="masks per image (evaluate's top-k)")
    ap.add_argument("--mask-size", type=int, default=32, help="M of the box-frame masks")
    ap.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (ours)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per row; the best is reported")
    args = ap.parse_args()

    settings = [("shapes 192x192", 192, 192, 15), ("COCO 640x480", 480, 640, 7)]
    rows = []
    eval_rows = []
    gpu = "cuda" if torch.cuda.is_available() else None
    for name, h, w, gt_per_image in settings:
        jobs = make_images(args.images, h, w, args.boxes, args.mask_size)
        n = len(jobs)
        t_ours, results = run_ours(jobs, args.workers, args.repeats)
        t_ours1, results1 = run_ours(jobs, 0, args.repeats)
        assert [r["segmentation"] for r in results] == [r["segmentation"] for r in results1]
        t_gs = time_naive(naive_grid_sample, jobs, args.repeats)
        t_int = time_naive(naive_interpolate, jobs, args.repeats)
        # equality of ours and the naive full-image grid_sample paste (same geometry)
        ref = naive_grid_sample(jobs[0])
        ours0 = [r["segmentation"] for r in image_results(dict(jobs[0]))]
        same = sum(a == b for a, b in zip(ours0, ref))
        row = {
            "setting": name,
            "ours_w": n / t_ours,
            "ours_1": n / t_ours1,
            "grid": n / t_gs,
            "interp": n / t_int,
            "same": f"{same}/{len(ref)}",
        }
        if gpu:
            row["gpu"] = n / time_gpu(jobs, gpu)
        rows.append(row)
        gt = fake_gt(results, jobs, gt_per_image)
        bbox = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        ids = [j["image_id"] for j in jobs]
        for ev in ("pycocotools", "faster"):
            t0 = time.perf_counter()
            s = run_cocoeval(gt, results, "segm", ids, args.boxes, evaluator=ev, threads=args.workers)
            t_segm = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_cocoeval(gt, bbox, "bbox", ids, args.boxes, evaluator=ev, threads=args.workers)
            t_bbox = time.perf_counter() - t0
            eval_rows.append(
                (name, ev, len(gt.dataset["annotations"]), len(results), t_segm, t_bbox, s.stats["AP"])
            )
        t0 = time.perf_counter()
        evaluate_results(gt, results, bbox, ids, args.boxes, threads=args.workers)
        t_all = time.perf_counter() - t0
        eval_rows.append(
            (name, "faster, all 4", len(gt.dataset["annotations"]), len(results), t_all, 0.0, -1.0)
        )

    print_tables(args, rows, eval_rows, gpu)


def print_tables(args, rows: list[dict], eval_rows: list[tuple], gpu: str | None) -> None:
    print(
        f"paste + threshold + RLE, {args.boxes} masks/image, M={args.mask_size}, {args.images} images per "
        f"setting, best of {args.repeats}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    head = (
        f"{'setting':16s} {'ours x' + str(args.workers) + ' proc':>14s} {'ours 1 proc':>12s} "
        f"{'naive grid':>11s} {'naive interp':>13s} {'speedup':>8s} {'RLE == grid':>12s}"
    )
    if gpu:
        head += f" {'ours GPU':>9s}"
    print(head + "   (images/s)")
    for r in rows:
        line = (
            f"{r['setting']:16s} {r['ours_w']:14.1f} {r['ours_1']:12.1f} {r['grid']:11.1f} "
            f"{r['interp']:13.1f} {r['ours_w'] / r['grid']:7.1f}x {r['same']:>12s}"
        )
        if gpu:
            line += f" {r['gpu']:9.1f}"
        print(line)
    print()
    print(
        f"{'COCOeval':16s} {'evaluator':>14s} {'GT':>6s} {'dets':>7s} {'segm s':>8s} {'bbox s':>8s} "
        f"{'segm ms/img':>12s} {'mask AP':>8s}"
    )
    print(
        "  ('faster, all 4': segm + bbox + boundary + occluded, what `mfdetr evaluate` runs; "
        "in the segm column)"
    )
    for name, ev, ngt, nd, ts, tb, ap_ in eval_rows:
        print(
            f"{name:16s} {ev:>14s} {ngt:6d} {nd:7d} {ts:8.2f} {tb:8.2f} {1000 * ts / args.images:12.1f} "
            f"{ap_:8.4f}"
        )


if __name__ == "__main__":
    main()
