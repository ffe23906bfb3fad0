"""Training-iteration speed: from the cache vs the live path (detector forward every step).

Two settings, each measured side by side in one run on the same images:

(a) the shipped ``shapes`` detector (``build_detector("shapes")``; a random-weight RT-DETR of the same
    architecture, from ``tools/train_shapes_detector.py``, when the weights are not there yet) at its
    resolution (192 px), batch 8;
(b) an R50-class Hugging Face RT-DETR (ResNet-50 backbone, 256-d encoder, 300 queries; random weights,
    built from a config, no download) at COCO resolution (640 x 640), batch 2.

Rows per setting:
- ``step (in memory)``: one mask-network training step (forward, loss, backward, AdamW) on batches
  already in memory: the compute floor;
- ``from cache``: DataLoader over the Zarr cache (2 workers) + the same step -- what
  ``train-from-cache`` does;
- ``live``: decode the images, ``detector.detect`` (its own preprocessing, forward under
  inference mode), build the same batch, then the same step -- training without a cache;
- ``preloaded``: the cache held in RAM (``mfdetr/cache/memory.py``, train-from-cache's default when it
  fits) + the same step at the thread count train-from-cache then uses (no workers: every core);
- ``loader only``: the DataLoader alone (2 workers), images/s, vs the step's images/s.

The step trains on the default ``TrainConfig`` (up to 4 matched + 1 unmatched boxes per image); with a
random-weight detector few boxes match, so the benchmark marks the first 8 valid boxes of every image
as matched (random targets): the step then costs what it costs with a real detector.

Run: ``python benchmarks/train_speed.py [--images-a 32] [--images-b 4] [--iters 6] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfdetr.cache.batch import collate_records, records_from_detections
from mfdetr.train.loop import TrainConfig, compute_threads, make_loader, train_select
from mfdetr.model.losses import compute_losses
from mfdetr.model import build_mask_net, count_parameters


def _rtdetr_small(size: int):
    """The shipped shapes architecture (``tools/train_shapes_detector.py``: s8, 100 queries), random weights."""
    import importlib.util

    from transformers import RTDetrImageProcessor

    tool = Path(__file__).resolve().parents[1] / "tools" / "train_shapes_detector.py"
    spec = importlib.util.spec_from_file_location("_train_shapes_detector", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = mod.CATEGORY_NAMES
    cfg = mod.build_config(len(names), dict(enumerate(names)), size, queries=100)
    return cfg, RTDetrImageProcessor(size={"height": size, "width": size}, do_normalize=False, do_pad=False)


def _rtdetr_r50(size: int):
    """RT-DETR with a ResNet-50 backbone (HF implementation, no timm), random weights."""
    from transformers import RTDetrConfig, RTDetrImageProcessor, RTDetrResNetConfig

    names = ["disc", "square", "triangle", "star", "ring", "cross"]
    cfg = RTDetrConfig(
        backbone_config=RTDetrResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                           layer_type="bottleneck", out_indices=[2, 3, 4]),
        use_timm_backbone=False, use_pretrained_backbone=False, num_labels=6,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )
    return cfg, RTDetrImageProcessor(size={"height": size, "width": size})


def _hf_folder(builder, size: int, root: Path) -> str:
    from transformers import RTDetrForObjectDetection

    cfg, proc = builder(size)
    torch.manual_seed(0)
    model = RTDetrForObjectDetection(cfg).eval()
    model.save_pretrained(root)
    proc.save_pretrained(root)
    return f"hf:{root}"


def _load_images(folder: Path, names: list[str]) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for n in names:
        with Image.open(folder / n) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous())
    return out


def _force_matched(batch: dict[str, Any], n: int = 8) -> dict[str, Any]:
    """Give every image >= n matched boxes (random targets) when the detector matched fewer."""
    valid = batch["valid"]
    matched = valid & (batch["match_ann_id"] >= 0)
    if int(matched.sum(1).min()) >= min(n, int(valid.sum(1).min())):
        return batch
    b = dict(batch)
    ids = batch["match_ann_id"].clone()
    first = valid & (valid.cumsum(1) <= n)
    ids[first] = torch.arange(int(first.sum()))
    b["match_ann_id"] = ids
    g = torch.Generator().manual_seed(0)
    b["mask_targets"] = torch.rand(batch["mask_targets"].shape, generator=g) > 0.5
    return b


class Stepper:
    """One mask-network training step (forward, loss, backward, AdamW), as train-from-cache runs it."""

    def __init__(self, levels, query_dim, cfg: TrainConfig):
        torch.manual_seed(0)
        self.cfg = cfg
        self.net = build_mask_net(cfg.model, levels, query_dim)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, foreach=True)

    def __call__(self, batch: dict[str, Any]) -> float:
        sel = train_select(batch, self.cfg.max_boxes_per_image, self.cfg.loss.unmatched_per_image)
        out = self.net(batch, sel)
        loss, _ = compute_losses(out, batch, self.cfg.loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


def _timed_steps(loader: Any, it: Any, step: Stepper, iters: int) -> list[float]:
    """Seconds of ``iters`` (next batch from ``it``, restarting ``loader`` when exhausted) + step."""
    times = []
    while len(times) < iters:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        step(_force_matched(b))
        times.append(time.perf_counter() - t)
    return times


def _median(ts: list[float]) -> float:
    return float(np.median(ts))


def run_setting(name: str, spec: str, images: Path, ann: Path, n_images: int, batch: int, iters: int, workers: int,
                work: Path, detector_topk: int, sets: list[str] | None = None) -> dict[str, Any]:
    import json

    from mfdetr.cache.reader import CacheDataset
    from mfdetr.detectors.registry import build_detector
    from mfdetr.extract.loop import ExtractOptions, extract

    cats = json.loads(ann.read_text())["categories"]
    det = build_detector(spec, categories=cats, topk=detector_topk)
    t = time.perf_counter()
    res = extract(det, images, ann, out=str(work / f"{name}.zarr"), opts=ExtractOptions(topk=detector_topk, block=4),
                  batch_size=batch, workers=0, progress=False)
    t_extract = time.perf_counter() - t
    ds = CacheDataset(res.path)
    from mfdetr.utils.config import apply_overrides, from_dict

    cfg = from_dict(TrainConfig, apply_overrides({}, sets or []))
    step = Stepper(ds.levels, ds.query_dim, cfg)
    nb = max(1, len(ds) // batch)
    batches = [_force_matched(ds.collate([ds[i] for i in range(j * batch, (j + 1) * batch)])) for j in range(nb)]
    n_boxes = [int(train_select(b, cfg.max_boxes_per_image, cfg.loss.unmatched_per_image).sum()) for b in batches]

    # warm-up, then the in-memory step
    step(batches[0])
    t_step = []
    for i in range(iters):
        t = time.perf_counter()
        step(batches[i % nb])
        t_step.append(time.perf_counter() - t)

    # from the cache: loader (workers) + step
    loader = make_loader(ds, batch, workers, shuffle=False, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is not a per-iteration cost
    t_cache = _timed_steps(loader, it, step, iters)

    # preloaded (train-from-cache's default for caches that fit in RAM): memory + the step, with the
    # threads train-from-cache then uses (no loader workers: every core)
    from mfdetr.cache.memory import preload

    mem = preload(ds, workers, progress=False)
    mem_loader = make_loader(mem, batch, 0, shuffle=False, drop_last=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(compute_threads(TrainConfig(workers=0), torch.device("cpu")))
    threads_mem = torch.get_num_threads()
    mit = iter(mem_loader)
    step(_force_matched(next(mit)))  # warm-up at this thread count
    t_mem = _timed_steps(mem_loader, mit, step, iters)
    torch.set_num_threads(threads_before)
    del mem, mem_loader, mit

    # loader alone: images/s over a few passes
    t = time.perf_counter()
    n_read = 0
    while n_read < max(4 * batch, min(len(ds), 64)):
        for b in loader:
            n_read += int(b["valid"].shape[0])
    loader_ips = n_read / (time.perf_counter() - t)
    del it, loader

    # live: decode + detect + batch + the same step
    with open(ann) as f:
        names = [im["file_name"] for im in sorted(json.load(f)["images"], key=lambda x: x["id"])]
    t_live, t_det = [], []
    for i in range(max(2, min(iters, 3))):
        j = i % nb
        t = time.perf_counter()
        ims = _load_images(images, names[j * batch:(j + 1) * batch])
        td = time.perf_counter()
        outs = det.detect(ims)
        t_det.append(time.perf_counter() - td)
        live = collate_records(records_from_detections(outs, topk=detector_topk), ds.levels)
        ref = batches[j]  # the targets (matching + crops) come from the cache: not timed, favouring live
        for key in ("match_ann_id", "match_iou", "mask_targets"):
            live[key] = ref[key]
        step(live)
        t_live.append(time.perf_counter() - t)
    return {
        "name": name, "spec": spec, "levels": ds.levels, "query_dim": ds.query_dim, "images": len(ds),
        "batch": batch, "boxes_per_step": float(np.mean(n_boxes)), "params": count_parameters(step.net),
        "extract_s": t_extract, "step": _median(t_step), "cache": _median(t_cache), "live": _median(t_live),
        "mem": _median(t_mem), "threads_mem": threads_mem,
        "detect": _median(t_det), "loader_ips": loader_ips, "step_ips": batch / _median(t_step),
        "input": tuple(int(v) for v in ds[0]["input_size"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images-a", type=int, default=32, help="images of the shapes setting (batch 8)")
    ap.add_argument("--images-b", type=int, default=4, help="images of the R50 / 640 px setting (batch 2)")
    ap.add_argument("--iters", type=int, default=6, help="timed iterations per row")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cache rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = what train-from-cache picks)")
    ap.add_argument("--skip-b", action="store_true", help="only the shapes setting")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="TrainConfig override for both settings, e.g. --set model.fuse_stride=8 (repeatable)")
    ap.add_argument("--set-b", dest="sets_b", action="append", default=[],
                    help="TrainConfig override for the R50 / 640 px setting only")
    args = ap.parse_args()
    # the training's own policy: the cores left after the loader's workers (see compute_threads)
    torch.set_num_threads(args.threads or compute_threads(TrainConfig(workers=args.workers), torch.device("cpu")))

    from mfdetr.data.synth import make_synth
    from mfdetr.detectors.registry import shapes_available

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_synth(work / "a", train=args.images_a, val=0, size=192, seed=123, workers=1)
        spec_a = "shapes" if shapes_available() else _hf_folder(_rtdetr_small, 192, work / "det_a")
        label_a = "shipped shapes" if spec_a == "shapes" else "shapes arch. (random weights)"
        rows.append(run_setting("a", spec_a, work / "a/train/images", work / "a/train/annotations.json",
                                args.images_a, 8, args.iters, args.workers, work, 50, args.sets) | {"label": label_a})
        if not args.skip_b:
            make_synth(work / "b", train=args.images_b, val=0, size=640, seed=123, workers=1)
            spec_b = _hf_folder(_rtdetr_r50, 640, work / "det_b")
            rows.append(run_setting("b", spec_b, work / "b/train/images", work / "b/train/annotations.json",
                                    args.images_b, 2, max(3, args.iters // 2), args.workers, work, 100,
                                    args.sets + args.sets_b)
                        | {"label": "RT-DETR R50 (random weights)"})

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"mask network {rows[0]['params'] / 1e6:.2f}M params, TrainConfig defaults"
          f"{' + ' + ' '.join(args.sets) if args.sets else ''}{'; R50 also ' + ' '.join(args.sets_b) if args.sets_b else ''}\n")
    hdr = (f"| setting | input | batch | boxes/step | step in memory | from cache ({args.workers} workers) | live "
           f"(detect) | live / cache | preloaded ({rows[0]['threads_mem']} threads) | live / preloaded | loader img/s "
           f"| step img/s | loader / step |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        print(f"| {r['label']} | {r['input'][0]}x{r['input'][1]} | {r['batch']} | {r['boxes_per_step']:.0f} | "
              f"{r['step'] * 1000:.0f} ms | {r['cache'] * 1000:.0f} ms | {r['live'] * 1000:.0f} ms "
              f"({r['detect'] * 1000:.0f}) | {r['live'] / r['cache']:.1f}x | {r['mem'] * 1000:.0f} ms | "
              f"{r['live'] / r['mem']:.1f}x | {r['loader_ips']:.0f} | "
              f"{r['step_ips']:.1f} | {r['loader_ips'] / r['step_ips']:.1f}x |")
    for r in rows:
        lv = ", ".join(f"{x.name}(s{x.stride},c{x.channels})" for x in r["levels"])
        print(f"\n{r['label']}: levels {lv}, query_dim {r['query_dim']}, extract {r['extract_s']:.1f}s "
              f"for {r['images']} images")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
