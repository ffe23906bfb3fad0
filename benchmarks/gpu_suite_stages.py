"""gpu_suite sections (b) extract, (c) train, (d) step from the cache vs live, (e) evaluate."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from _common import force_matched
from gpu_suite import Context, finite, sync
from gpu_suite_models import cache, decoded_images, detector, extract_batch, forward_alone, synth

MIOU_TOL = 0.01  # bf16 autocast vs fp32: val mean mask IoU after the same schedule on the same cache


# ----------------------------------------------------------------------------------------- (b) extract
def section_extract(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for key in ("shapes", "r50"):
        det, desc = detector(ctx, key)
        images, ann = synth(ctx, key)["train"]
        _, ims = decoded_images(ann, images)
        bs = extract_batch(ctx)
        fwd = forward_alone(ctx, key, ims, bs)
        c = cache(ctx, key)
        res, ext = c["result"], c["seconds"]
        n = len(ims)
        t = res.timings
        rows.append(
            {
                "name": desc,
                "images": n,
                "batch": bs,
                "writers": c["writers"],
                "forward_img_s": n / fwd,
                "extract_img_s": n / ext,
                "overhead": ext / fwd - 1,
                "in_extract_detect_s": t.get("detect"),
                "load_wait_s": t.get("load_wait"),
                "put_wait_s": t.get("put_wait"),
                "writer_tail_s": t.get("final_write_wait"),
                "write_cpu_ms_img": 1e3 * t["write_cpu"] / n if t.get("write_cpu") is not None else None,
                "ok": res.images_done == n and finite(fwd, ext),
            }
        )
    if "val" in synth(ctx, "shapes"):
        cache(ctx, "shapes", "val")  # for (c) and (e); not timed here
    return rows


# -------------------------------------------------------------------------------------------- the step
class Step:
    """One mask-network training step exactly as train-from-cache runs it (``mfdetr.train.step.train_step``:
    selection, forward under autocast, losses, backward, clipping, AdamW), on a fresh mask network."""

    def __init__(self, levels, query_dim: int, device: torch.device, amp: str) -> None:
        from mfdetr.model import build_mask_net
        from mfdetr.train import TrainConfig
        from mfdetr.train.step import build_optimizer, build_scaler

        torch.manual_seed(0)
        self.cfg = TrainConfig(amp=amp, lr=1e-4, device=str(device))
        self.device = device
        self.net = build_mask_net(self.cfg.model, levels, query_dim).to(device)
        self.opt = build_optimizer(self.net, self.cfg)
        self.scaler = build_scaler(device, self.cfg)

    def __call__(self, batch: dict[str, Any]) -> float:
        from mfdetr.train.step import train_step

        return train_step(self.net, batch, self.opt, self.scaler, self.cfg, self.device).loss


def _field(result: Any, key: str) -> Any:
    """A field of train_from_cache's result (a dataclass; a dict in older trees)."""
    return result[key] if isinstance(result, dict) else getattr(result, key)


def _loader(ctx: Context, ds, batch: int, workers: int):
    from mfdetr.cache.loader import make_loader

    return make_loader(
        ds, batch, workers, shuffle=False, drop_last=True, pin_memory=ctx.device.type == "cuda"
    )


def _timed_iters(ctx: Context, make_batch, step: Step, iters: int) -> tuple[list[float], list[float]]:
    """(seconds per iteration of make_batch(i) + step, losses), synchronized, after one warm-up iteration."""
    step(make_batch(0))
    ts, losses = [], []
    for i in range(iters):
        sync(ctx.device)
        t = time.perf_counter()
        losses.append(step(make_batch(i + 1)))
        sync(ctx.device)
        ts.append(time.perf_counter() - t)
        if ctx.budget.over():
            break
    return ts, losses


# ------------------------------------------------------------------------------------------- (c) train
def section_train(ctx: Context) -> list[dict[str, Any]]:
    from mfdetr.cache.batch import batch_to
    from mfdetr.cache.reader import CacheDataset
    from mfdetr.train import TrainConfig, train_from_cache

    p = ctx.prof
    tr, va = cache(ctx, "shapes")["result"], cache(ctx, "shapes", "val")["result"]
    rows, runs = [], {}
    for amp in ("off", "bf16"):
        cfg = TrainConfig(
            epochs=p.epochs,
            batch_size=p.batch,
            amp=amp,
            device=str(ctx.device),
            workers=p.workers,
            seed=0,
            warmup_iters=10,
            val_batch_size=16,
            threads=1 if p.quick else 0,
        )
        s = train_from_cache(tr.path, ctx.work / f"run_{amp}", cfg, val_cache=va.path, progress=False)
        f = {
            k: _field(s, k)
            for k in ("losses", "steps", "images_per_s", "train_seconds", "val_miou", "best_checkpoint")
        }
        runs[amp] = f
        losses = f["losses"]
        rows.append(
            {
                "name": f"train-from-cache amp={amp}",
                "images": tr.num_images,
                "epochs": p.epochs,
                "steps": f["steps"],
                "img_s": f["images_per_s"],
                "train_s": f["train_seconds"],
                "final_loss": losses[-1] if losses else float("nan"),
                "val_miou": f["val_miou"],
                "losses_finite": all(math.isfinite(v) for v in losses),
                "ok": bool(losses) and all(math.isfinite(v) for v in losses) and finite(f["val_miou"]),
            }
        )
    d = abs(runs["bf16"]["val_miou"] - runs["off"]["val_miou"])
    rows.append(
        {
            "name": "bf16 vs fp32 val mIoU",
            "miou_fp32": runs["off"]["val_miou"],
            "miou_bf16": runs["bf16"]["val_miou"],
            "abs_diff": d,
            "tol": MIOU_TOL,
            "within_tol": bool(d <= MIOU_TOL),
            "ok": finite(d),
        }
    )
    ctx.memo("checkpoint", lambda: runs["bf16"]["best_checkpoint"])

    # loader alone vs the step alone (bf16 on CUDA), images/s
    ds = CacheDataset(tr.path)
    loader = _loader(ctx, ds, p.batch, p.workers)
    it = iter(loader)
    next(it)  # worker start-up is not a per-batch cost
    t, n = time.perf_counter(), 0
    for b in it:
        n += int(b["valid"].shape[0])
    loader_ips = n / max(time.perf_counter() - t, 1e-9)
    amp = "bf16" if ctx.device.type == "cuda" else "off"
    step = Step(ds.levels, ds.query_dim, ctx.device, amp)
    batches = [force_matched(batch_to(b, ctx.device)) for _, b in zip(range(4), loader)]
    ts, _ = _timed_iters(ctx, lambda i: batches[i % len(batches)], step, p.step_iters)
    step_ips = p.batch / statistics.median(ts)
    rows.append(
        {
            "name": f"loader ({p.workers} workers, pinned={ctx.device.type == 'cuda'}) vs step (amp={amp})",
            "loader_img_s": loader_ips,
            "step_img_s": step_ips,
            "loader_over_step": loader_ips / step_ips,
            "ok": finite(loader_ips, step_ips),
        }
    )
    return rows


# ------------------------------------------------------------------------------ (d) step: cache vs live
def _step_vs_live(ctx: Context, key: str) -> dict[str, Any]:
    from mfdetr.cache.batch import batch_to, collate_records, records_from_detections
    from mfdetr.cache.reader import CacheDataset

    det, desc = detector(ctx, key)
    res = cache(ctx, key)["result"]
    images, ann = synth(ctx, key)["train"]
    ds = CacheDataset(res.path)
    bs = 2
    amp = "bf16" if ctx.device.type == "cuda" else "off"
    step = Step(ds.levels, ds.query_dim, ctx.device, amp)
    loader = _loader(ctx, ds, bs, ctx.prof.workers)
    state = {"it": iter(loader)}

    def from_cache(_i):
        try:
            b = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            b = next(state["it"])
        return force_matched(batch_to(b, ctx.device))

    t_cache, l_cache = _timed_iters(ctx, from_cache, step, ctx.prof.step_iters)
    cached = [ds.collate([ds[j] for j in range(s, s + bs)]) for s in range(0, len(ds) - bs + 1, bs)]
    import json

    from mfdetr.data.coco import load_image

    files = {i["id"]: images / i["file_name"] for i in json.loads(ann.read_text())["images"]}

    def live(
        i,
    ):  # decode + detector forward + batch + the cache's targets for the same images (not timed apart)
        ref = cached[i % len(cached)]
        ims = [load_image(files[int(iid)]).to(ctx.device) for iid in ref["image_id"]]
        outs = det.detect(ims)
        b = collate_records(
            records_from_detections([o.to("cpu") for o in outs], topk=ref["boxes"].shape[1]), ds.levels
        )
        for k in ("match_ann_id", "match_iou", "mask_targets"):
            b[k] = ref[k]
        return force_matched(batch_to(b, ctx.device))

    t_live, l_live = _timed_iters(ctx, live, step, max(2, min(ctx.prof.step_iters, 4)))
    c, lv = statistics.median(t_cache), statistics.median(t_live)
    return {
        "name": desc,
        "batch": bs,
        "amp": amp,
        "cache_step_ms": 1e3 * c,
        "live_step_ms": 1e3 * lv,
        "live_over_cache": lv / c,
        "cache_img_s": bs / c,
        "live_img_s": bs / lv,
        "levels": ",".join(f"{x.name}:c{x.channels}" for x in ds.levels),
        "ok": finite(c, lv, *l_cache, *l_live),
    }


def section_step_vs_live(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for key in ("r50", "paper"):
        try:
            rows.append(_step_vs_live(ctx, key))
        except Exception as e:  # one detector failing keeps the other's row
            if type(e).__name__ == "SectionTimeout":
                raise
            rows.append({"name": key, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


# ---------------------------------------------------------------------------------------- (e) evaluate
def section_evaluate(ctx: Context) -> list[dict[str, Any]]:
    from mfdetr.evaluate import EvalConfig, evaluate

    ckpt = ctx.memo("checkpoint", lambda: None)
    if ckpt is None:
        section_train(ctx)
        ckpt = ctx.memo("checkpoint", lambda: None)
    va = cache(ctx, "shapes", "val")["result"]
    cfg = EvalConfig(device=str(ctx.device), workers=ctx.prof.workers, progress=False)
    t = time.perf_counter()
    r = evaluate(va.path, ckpt, cfg, out=ctx.work / "eval")
    wall = time.perf_counter() - t
    ap = r.mask_ap
    return [
        {
            "name": "evaluate (shapes val cache, bf16-trained checkpoint)",
            "images": r.num_images,
            "masks_img_s": r.images_per_s,
            "wall_img_s": r.num_images / wall,
            "mask_ap": ap if ap is not None else float("nan"),
            "cocoeval_s": r.timing.get("cocoeval_s"),
            "model_s": r.timing.get("model_s"),
            "ok": finite(r.images_per_s),
        }
    ]
