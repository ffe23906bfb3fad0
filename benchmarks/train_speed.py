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
from mfdetr.cache.loader import make_loader
from mfdetr.cache.storage import project_features, unpack_projection
from mfdetr.model import build_mask_net, count_parameters
from mfdetr.train.config import TrainConfig
from mfdetr.train.runtime import compute_threads
from mfdetr.train.schedule import build_scheduler
from mfdetr.train.selection import train_select
from mfdetr.train.step import build_optimizer, build_scaler, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import force_matched, labels, shapes_config, shapes_processor  # noqa: E402


def _rtdetr_small(size: int):
    """The shipped shapes architecture (``tools/train_shapes_detector.py``: s8, 100 queries) and its processor."""
    return shapes_config(size, queries=100), shapes_processor(size)


def _rtdetr_r50(size: int):
    """RT-DETR with a ResNet-50 backbone (HF implementation, no timm), random weights."""
    from transformers import RTDetrConfig, RTDetrImageProcessor, RTDetrResNetConfig

    names = ["disc", "square", "triangle", "star", "ring", "cross"]
    cfg = RTDetrConfig(
        backbone_config=RTDetrResNetConfig(
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            layer_type="bottleneck",
            out_indices=[2, 3, 4],
        ),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        **labels(dict(enumerate(names))),
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
    from mfdetr.data.image_io import load_image

    return [load_image(folder / n) for n in names]


class Stepper:
    """train-from-cache's own step (``mfdetr.train.step.train_step``) with its optimizer, LR schedule and
    scaler, on the CPU."""

    def __init__(self, levels, query_dim, cfg: TrainConfig):
        torch.manual_seed(0)
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.net = build_mask_net(cfg.model, levels, query_dim)
        self.opt = build_optimizer(self.net, cfg)
        self.scaler = build_scaler(self.device, cfg)
        self.sched = build_scheduler(
            self.opt,
            10_000,
            cfg.warmup_iters,
            cfg.schedule,
            cfg.min_lr_ratio,
            cfg.step_milestones,
            cfg.step_gamma,
        )

    def __call__(self, batch: dict[str, Any]) -> float:
        return train_step(self.net, batch, self.opt, self.scaler, self.cfg, self.device, self.sched).loss


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
        step(force_matched(b))
        times.append(time.perf_counter() - t)
    return times


def _median(ts: list[float]) -> float:
    return float(np.median(ts))


def _preloaded_row(ds: Any, batch: int, workers: int, step: Stepper, iters: int) -> tuple[list[float], int]:
    """Preloaded (train-from-cache's default for caches that fit in RAM): memory + the step, with the
    threads train-from-cache then uses (no loader workers: every core). -> (seconds, threads)."""
    from mfdetr.cache.memory import preload

    mem = preload(ds, workers, progress=False)
    mem_loader = make_loader(mem, batch, 0, shuffle=False, drop_last=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(compute_threads(TrainConfig(workers=0), torch.device("cpu"), workers=0))
    threads_mem = torch.get_num_threads()
    mit = iter(mem_loader)
    step(force_matched(next(mit)))  # warm-up at this thread count
    t_mem = _timed_steps(mem_loader, mit, step, iters)
    torch.set_num_threads(threads_before)
    return t_mem, threads_mem


def _loader_ips(loader: Any, batch: int, n: int) -> float:
    """The loader alone: images/s over a few passes."""
    t = time.perf_counter()
    n_read = 0
    while n_read < max(4 * batch, min(n, 64)):
        for b in loader:
            n_read += int(b["valid"].shape[0])
    return n_read / (time.perf_counter() - t)


def _live_rows(
    det: Any,
    images: Path,
    ann: Path,
    ds: Any,
    batches: list,
    batch: int,
    iters: int,
    step: Stepper,
    topk: int,
) -> tuple[list[float], list[float]]:
    """Live: decode + detect + batch + the same step. -> (seconds per iteration, detect seconds)."""
    import json

    with open(ann) as f:
        names = [im["file_name"] for im in sorted(json.load(f)["images"], key=lambda x: x["id"])]
    bases = unpack_projection((ds.attrs.get("storage") or {}).get("project"))
    t_live, t_det = [], []
    for i in range(max(2, min(iters, 3))):
        j = i % len(batches)
        t = time.perf_counter()
        ims = _load_images(images, names[j * batch : (j + 1) * batch])
        td = time.perf_counter()
        outs = det.detect(ims)
        t_det.append(time.perf_counter() - td)
        for o in outs:  # a projected cache: live maps in its bases, as predict does
            o.features = project_features(o.features, bases)
        live = collate_records(records_from_detections(outs, topk=topk), ds.levels)
        ref = batches[j]  # the targets (matching + crops) come from the cache: not timed, favouring live
        for key in ("match_ann_id", "match_iou", "mask_targets"):
            live[key] = ref[key]
        step(live)
        t_live.append(time.perf_counter() - t)
    return t_live, t_det


# --storage: the cache format the loader decodes (rec: the README's recommended COCO storage)
STORAGE = {
    "default": lambda levels: {},
    "rec": lambda levels: dict(
        dtype="bfloat16",
        quant="int8",
        quant_bits=6,
        project={lv.name: 32 for lv in levels if lv.channels > 32},
    ),
}


def run_setting(
    name: str, spec: str, batch: int, iters: int, detector_topk: int, sets: list[str], args: Any, work: Path
) -> dict[str, Any]:
    """One setting's rows over the synth split ``work/name/train`` (``args``: workers, storage)."""
    images, ann = work / name / "train" / "images", work / name / "train" / "annotations.json"
    workers, storage = args.workers, args.storage
    import json

    from mfdetr.cache.reader import CacheDataset
    from mfdetr.detectors.registry import build_detector
    from mfdetr.extract.loop import ExtractOptions, extract
    from mfdetr.utils.config import apply_overrides, from_dict

    det = build_detector(spec, categories=json.loads(ann.read_text())["categories"], topk=detector_topk)
    t = time.perf_counter()
    res = extract(
        det,
        images,
        ann,
        out=str(work / f"{name}.zarr"),
        opts=ExtractOptions(topk=detector_topk, block=4, **STORAGE[storage](det.levels)),
        batch_size=batch,
        workers=0,
        progress=False,
    )
    t_extract = time.perf_counter() - t
    ds = CacheDataset(res.path)
    cfg = from_dict(TrainConfig, apply_overrides({}, sets or []))
    step = Stepper(ds.levels, ds.query_dim, cfg)
    nb = max(1, len(ds) // batch)
    batches = [
        force_matched(ds.collate([ds[i] for i in range(j * batch, (j + 1) * batch)])) for j in range(nb)
    ]
    n_unmatched = cfg.loss.unmatched_per_image if cfg.loss.iou_unmatched else 0
    n_boxes = [int(train_select(b, cfg.max_boxes_per_image, n_unmatched).sum()) for b in batches]

    step(batches[0])  # warm-up, then the in-memory step
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
    t_mem, threads_mem = _preloaded_row(ds, batch, workers, step, iters)
    loader_ips = _loader_ips(loader, batch, len(ds))
    del it, loader
    t_live, t_det = _live_rows(det, images, ann, ds, batches, batch, iters, step, detector_topk)
    return {
        "name": name,
        "spec": spec,
        "levels": ds.levels,
        "query_dim": ds.query_dim,
        "images": len(ds),
        "batch": batch,
        "boxes_per_step": float(np.mean(n_boxes)),
        "params": count_parameters(step.net),
        "extract_s": t_extract,
        "step": _median(t_step),
        "cache": _median(t_cache),
        "live": _median(t_live),
        "mem": _median(t_mem),
        "threads_mem": threads_mem,
        "detect": _median(t_det),
        "loader_ips": loader_ips,
        "step_ips": batch / _median(t_step),
        "input": tuple(int(v) for v in ds[0]["input_size"]),
    }


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images-a", type=int, default=32, help="images of the shapes setting (batch 8)")
    ap.add_argument("--images-b", type=int, default=4, help="images of the R50 / 640 px setting (batch 2)")
    ap.add_argument("--iters", type=int, default=6, help="timed iterations per row")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cache rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = what train-from-cache picks)")
    ap.add_argument("--skip-b", action="store_true", help="only the shapes setting")
    ap.add_argument(
        "--storage", choices=sorted(STORAGE), default="default", help="cache format of the cache rows"
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="TrainConfig override for both settings, e.g. --set model.fuse_stride=8 (repeatable)",
    )
    ap.add_argument(
        "--set-b",
        dest="sets_b",
        action="append",
        default=[],
        help="TrainConfig override for the R50 / 640 px setting only",
    )
    return ap.parse_args()


def main() -> None:
    args = _parse_args()
    # the training's own policy: the cores left after the loader's workers (see compute_threads)
    torch.set_num_threads(
        args.threads
        or compute_threads(TrainConfig(workers=args.workers), torch.device("cpu"), workers=args.workers)
    )

    from mfdetr.data.synth import make_synth
    from mfdetr.detectors.registry import shapes_available

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_synth(work / "a", train=args.images_a, val=0, size=192, seed=123, workers=1)
        spec_a = "shapes" if shapes_available() else _hf_folder(_rtdetr_small, 192, work / "det_a")
        label_a = "shipped shapes" if spec_a == "shapes" else "shapes arch. (random weights)"
        # (name, detector spec, batch, iters, detector top-k, TrainConfig overrides, label)
        settings = [("a", spec_a, 8, args.iters, 50, args.sets, label_a)]
        if not args.skip_b:
            make_synth(work / "b", train=args.images_b, val=0, size=640, seed=123, workers=1)
            spec_b = _hf_folder(_rtdetr_r50, 640, work / "det_b")
            iters_b, sets_b = max(3, args.iters // 2), args.sets + args.sets_b
            settings.append(("b", spec_b, 2, iters_b, 100, sets_b, "RT-DETR R50 (random weights)"))
        for *setting, label in settings:
            rows.append(run_setting(*setting, args, work) | {"label": label})

    _print_table(rows, args)


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"mask network {rows[0]['params'] / 1e6:.2f}M params, cache storage {args.storage}, TrainConfig defaults"
        f"{' + ' + ' '.join(args.sets) if args.sets else ''}"
        f"{'; R50 also ' + ' '.join(args.sets_b) if args.sets_b else ''}\n"
    )
    hdr = (
        f"| setting | input | batch | boxes/step | step in memory | from cache ({args.workers} workers) "
        f"| live (detect) | live / cache | preloaded ({rows[0]['threads_mem']} threads) | live / preloaded "
        f"| loader img/s | step img/s | loader / step |"
    )
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        print(
            f"| {r['label']} | {r['input'][0]}x{r['input'][1]} | {r['batch']} | {r['boxes_per_step']:.0f} | "
            f"{r['step'] * 1000:.0f} ms | {r['cache'] * 1000:.0f} ms | {r['live'] * 1000:.0f} ms "
            f"({r['detect'] * 1000:.0f}) | {r['live'] / r['cache']:.1f}x | {r['mem'] * 1000:.0f} ms | "
            f"{r['live'] / r['mem']:.1f}x | {r['loader_ips']:.0f} | "
            f"{r['step_ips']:.1f} | {r['loader_ips'] / r['step_ips']:.1f}x |"
        )
    for r in rows:
        lv = ", ".join(f"{x.name}(s{x.stride},c{x.channels})" for x in r["levels"])
        print(
            f"\n{r['label']}: levels {lv}, query_dim {r['query_dim']}, extract {r['extract_s']:.1f}s "
            f"for {r['images']} images"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
