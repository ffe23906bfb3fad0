"""gpu_suite: the detectors, synth data and caches the stage sections share (built once per run).

Detectors (random weights from configs, no download; ``--quick`` swaps in tiny ones of the same kind):
- ``shapes``: the shipped detector (its architecture with random weights if the weights are missing);
- ``r50``: RT-DETR with transformers' ResNet-50 (``RTDetrConfig`` defaults), 640x640;
- ``paper``: a two-stage Deformable DETR with box refinement (the DINO-style family the paper freezes),
  900 queries, Swin-L backbone (embed 192, depths 2/2/18/2, heads 6/12/24/48, window 12), input resized to
  800x1333.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import column, r50_config, shapes_config, two_stage_deformable_config
from gpu_suite import Context, sync


def _id2label() -> dict[int, str]:
    from mfdetr.data.synth_shapes import CATEGORIES

    return dict(enumerate(CATEGORIES))


# field: (tiny, for --quick; Swin-L, the paper's strongest frozen detectors use it): the "paper" detector's
# Swin backbone and its DINO-like two-stage deformable head
PAPER_SWIN = {
    "image_size": (224, 384),
    "embed_dim": (16, 192),
    "depths": ([1, 1, 1, 1], [2, 2, 18, 2]),
    "num_heads": ([1, 1, 2, 2], [6, 12, 24, 48]),
    "window_size": (4, 12),
}
PAPER_HEAD = {  # the encoder and the decoder have the same depth and FFN width
    "d_model": (32, 256),
    "layers": (1, 6),
    "ffn_dim": (64, 2048),
    "num_queries": (30, 900),
}


def _paper_config(tiny: bool):
    import transformers as t

    col = 0 if tiny else 1
    swin = t.SwinConfig(out_features=["stage2", "stage3", "stage4"], **column(PAPER_SWIN, col))
    head = column(PAPER_HEAD, col)
    sizes = dict(d_model=head["d_model"], num_queries=head["num_queries"])
    for part in ("encoder", "decoder"):
        sizes |= {f"{part}_layers": head["layers"], f"{part}_ffn_dim": head["ffn_dim"]}
    return two_stage_deformable_config(swin, _id2label(), **sizes)


def _save(folder: Path, model_cls: str, proc_cls: str, cfg, proc_kw: dict) -> str:
    import transformers as t

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        getattr(t, model_cls)(cfg).save_pretrained(folder)
        getattr(t, proc_cls)(**proc_kw).save_pretrained(folder)
    return f"hf:{folder}"


def detector_spec(ctx: Context, key: str) -> tuple[str, str]:
    """(spec, description) of detector ``key`` (shapes | r50 | paper)."""
    from mfdetr.detectors.registry import shapes_available

    p, tiny = ctx.prof, ctx.prof.quick
    folder = ctx.work / f"det_{key}"
    if key == "shapes":
        if shapes_available():
            return "shapes", "shipped shapes detector (192 px)"
        return (
            _save(
                folder,
                "RTDetrForObjectDetection",
                "RTDetrImageProcessor",
                shapes_config(192, 100),
                {"size": {"height": 192, "width": 192}, "do_normalize": False},
            ),
            "shapes architecture, random weights (192 px)",
        )
    if key == "r50":
        cfg = shapes_config(p.r50_size, 30) if tiny else r50_config(_id2label())
        desc = f"RT-DETR {'tiny' if tiny else 'R50'} random weights {p.r50_size}x{p.r50_size}"
        return (
            _save(
                folder,
                "RTDetrForObjectDetection",
                "RTDetrImageProcessor",
                cfg,
                {"size": {"height": p.r50_size, "width": p.r50_size}},
            ),
            desc,
        )
    if key == "paper":
        h, w = p.paper_hw
        desc = f"two-stage Deformable DETR, {'tiny Swin' if tiny else 'Swin-L'}, random weights, {h}x{w}"
        return (
            _save(
                folder,
                "DeformableDetrForObjectDetection",
                "DeformableDetrImageProcessor",
                _paper_config(tiny),
                {"size": {"height": h, "width": w}},
            ),
            desc,
        )
    raise KeyError(key)


def detector(ctx: Context, key: str):
    """(FrozenDetector on the device, description), built once."""

    def build():
        from mfdetr.detectors.registry import build_detector

        spec, desc = detector_spec(ctx, key)
        cats = [{"id": i + 1, "name": n} for i, n in _id2label().items()]
        return build_detector(spec, categories=cats, device=ctx.device, topk=100), desc

    return ctx.memo(f"det:{key}", build)


def synth(ctx: Context, key: str) -> dict[str, Path]:
    """The synth split(s) of ``key``: {"train": (images, ann), "val": ...} (val only for shapes)."""

    def build():
        from mfdetr.data.synth import make_synth

        p = ctx.prof
        n_train, n_val, size = {
            "shapes": (p.n_train, p.n_val, p.synth_size),
            "r50": (p.n_r50, 0, p.r50_size),
            "paper": (p.n_paper, 0, 96 if p.quick else 800),
        }[key]
        root = ctx.work / f"synth_{key}"
        make_synth(root, train=n_train, val=n_val, size=size, seed=7, workers=1 if p.quick else 8)
        return {
            s: (root / s / "images", root / s / "annotations.json")
            for s in ("train", "val")
            if (n_val or s == "train")
        }

    return ctx.memo(f"synth:{key}", build)


def decoded_images(ann: Path, images: Path) -> tuple[list[int], list[torch.Tensor]]:
    """(image ids, uint8 [3,H,W] images) in the dataset's order (ids ascending, as the cache stores them)."""
    from mfdetr.data.coco import load_image

    data = json.loads(Path(ann).read_text())
    infos = sorted(data["images"], key=lambda x: x["id"])
    return [i["id"] for i in infos], [load_image(Path(images) / i["file_name"]) for i in infos]


def extract_batch(ctx: Context) -> int:
    return 2 if ctx.prof.quick else 8


def cache(ctx: Context, key: str, split: str = "train") -> dict[str, Any]:
    """{"result": ExtractResult, "seconds": wall s, "batch": batch size} of detector ``key`` over its
    ``split``, extracted once on the device (writers: the extract default, or the profile's)."""

    def build():
        from mfdetr.extract import ExtractOptions, extract

        det, _ = detector(ctx, key)
        images, ann = synth(ctx, key)[split]
        kw: dict[str, Any] = {} if ctx.prof.writers is None else {"writers": ctx.prof.writers}
        bs = extract_batch(ctx)
        sync(ctx.device)
        t = time.perf_counter()
        res = extract(
            det,
            images,
            ann,
            out=str(ctx.work / f"{key}_{split}.zarr"),
            opts=ExtractOptions(topk=100),
            device=str(ctx.device),
            batch_size=bs,
            workers=ctx.prof.workers,
            progress=False,
            **kw,
        )
        return {
            "result": res,
            "seconds": time.perf_counter() - t,
            "batch": bs,
            "writers": kw.get("writers", "default"),
        }

    return ctx.memo(f"cache:{key}:{split}", build)


def forward_alone(ctx: Context, key: str, images: list[torch.Tensor], batch: int) -> float:
    """Wall seconds of ``detector.detect`` over in-memory images in ``batch``-image batches, outputs
    moved to the host (as extract does), after one warm-up batch."""
    det, _ = detector(ctx, key)
    det.detect([im.to(ctx.device) for im in images[:batch]])
    sync(ctx.device)
    t = time.perf_counter()
    for s in range(0, len(images), batch):
        outs = det.detect([im.to(ctx.device) for im in images[s : s + batch]])
        [o.to("cpu") for o in outs]
    sync(ctx.device)
    return time.perf_counter() - t
