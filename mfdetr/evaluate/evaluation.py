"""``mfdetr evaluate``: COCO mask and box AP of a mask network over a (validation) cache.

Flow per batch of cache records: mask network (no detector, no image) -> per image, the top-``topk``
boxes by final score (detection score x predicted mask IoU with mask scoring) -> probabilities
``sigmoid(logits)`` -> paste into the original image only inside each box (per box in worker
processes on CPU; chunked on the device on GPU, see :mod:`mfdetr.evaluate.paste`) -> threshold -> RLE
(:mod:`mfdetr.evaluate.coco_results`). Worker processes take one image each, so no more than a few
images' masks ever exist at once. Then COCOeval (segm and bbox), the AP table, ``summary.json`` and
optional overlay PNGs.

Box results (``results_bbox.json``) are the frozen detector's own: the top-``topk`` valid boxes by
detection score, so the box AP is the detector's box AP on the cached boxes.

The mask-network step (``image_jobs``, ``box_results``) lives in :mod:`mfdetr.evaluate.jobs`, the
checkpoint metadata and compatibility check (``meta_detector``, ``meta_categories``,
``check_compatible``, ``level_dicts``) in :mod:`mfdetr.evaluate.meta`; both are re-exported here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from mfdetr.evaluate.coco_results import (
    ResultPool,
    format_table,
    load_coco,
    run_cocoeval,
)
from mfdetr.evaluate.jobs import box_results, image_jobs
from mfdetr.evaluate.meta import get, check_compatible, level_dicts, meta_categories, meta_detector  # noqa: F401
from mfdetr.errors import MfdetrError


# ------------------------------------------------------------------------------------------ images
def read_image(path: str | Path) -> np.ndarray:
    """uint8 ``[3, H, W]`` RGB of an image file (``mfdetr.data.coco.load_image``: the stored pixels,
    any mode converted to RGB), as numpy."""
    from mfdetr.data.coco import load_image

    return load_image(Path(path)).numpy()


def _image_path(images_root: str | None, annotations: Path, file_name: str) -> Path:
    p = Path(file_name)
    if p.is_absolute():
        return p
    root = Path(images_root) if images_root else annotations.parent
    return root / p


# --------------------------------------------------------------------------------------- evaluate
def evaluate(
    cache: str,
    checkpoint: Path,
    annotations: Path | None = None,
    out: Path | None = None,
    topk: int = 100,
    vis: int = 0,
    mask_score: bool = True,
    per_category: bool = False,
    batch_size: int = 8,
    workers: int = 2,
    device: str | torch.device = "cpu",
    mask_threshold: float = 0.5,
    progress: bool = True,
    vis_score_threshold: float = 0.3,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the done images of ``cache``; returns the summary dict.

    Args:
        cache: a cache store path or URL (its recorded annotation file is the default GT).
        checkpoint: a mask-network checkpoint (must match the cache's detector fingerprint and levels).
        annotations: the COCO annotation JSON (default: the cache's ``dataset.annotations``).
        out: output directory (default ``<run dir>/eval`` for ``<run dir>/checkpoints/X.pt``, else
            ``<checkpoint dir>/eval``): ``results_segm.json``,
            ``results_bbox.json``, ``summary.json``, ``vis/*.png``.
        topk: masks (and boxes) kept per image, by final score; also COCOeval's maxDets.
        vis: overlay PNGs for the first ``vis`` images (results >= ``vis_score_threshold``).
        mask_score: final score = detection score x predicted mask IoU (else the detection score).
        per_category: also per-category AP (summary and table).
        batch_size: cache images per mask-network batch.
        workers: paste/encode worker processes (0 = in process).
        device: where the mask network (and, off-CPU, the chunked paste) runs.
        mask_threshold: probability threshold of the pasted masks.
        progress: print a progress bar and the table.

    Returns:
        ``{"segm": {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}, "bbox": {...}
        (the detector's boxes), "num_images", "num_detections", "images_per_s", "timing": {...},
        "files": {...}, "settings": {...}}`` plus, with ``per_category``, ``"per_category": {"segm":
        {cat_id: AP}, "bbox": {...}}`` and ``"categories": {cat_id: name}``; COCO fractions in [0, 1]
        (-1 where undefined). The returned dict also holds ``"table"`` (the printed text).
    """
    from mfdetr.cache.reader import CacheDataset
    from mfdetr.model.checkpoint import load_mask_net

    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise MfdetrError(f"checkpoint {checkpoint} does not exist")
    dev = torch.device(device)
    ds = CacheDataset(cache, load_targets=False)
    attrs = ds.attrs
    dataset_attrs = attrs.get("dataset") or {}
    if annotations is None:
        ann = dataset_attrs.get("annotations")
        if not ann:
            raise MfdetrError(f"cache {cache} records no annotation file: pass --annotations")
        annotations = Path(ann)
    annotations = Path(annotations)
    if not annotations.exists():
        raise MfdetrError(f"annotation file {annotations} does not exist: pass --annotations")
    model, meta = load_mask_net(checkpoint, map_location=dev)
    check_compatible(meta, attrs, str(cache), checkpoint)
    model = model.to(dev).eval()
    if len(ds) == 0:
        raise MfdetrError(f"cache {cache} has no finished (done) images to evaluate")

    if out is None:  # <run dir>/eval for <run dir>/checkpoints/last.pt
        parent = checkpoint.resolve().parent
        out = (parent.parent if parent.name == "checkpoints" else parent) / "eval"
    out = Path(out)
    gt = load_coco(annotations)
    cats = dataset_attrs.get("categories") or gt.loadCats(gt.getCatIds())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=ds.collate, num_workers=0)
    settings = {
        "cache": str(cache),
        "checkpoint": str(checkpoint),
        "batch_size": batch_size,
    }
    return evaluate_batches(
        model,
        loader,
        gt,
        out,
        annotations=annotations,
        images_root=dataset_attrs.get("images"),
        categories=cats,
        num_images=len(ds),
        topk=topk,
        vis=vis,
        mask_score=mask_score,
        per_category=per_category,
        workers=workers,
        device=dev,
        mask_threshold=mask_threshold,
        progress=progress,
        vis_score_threshold=vis_score_threshold,
        settings=settings,
        t_start=t_start,
    )


def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    gt: Any,
    out: Path,
    annotations: Path | None = None,
    images_root: str | None = None,
    categories: Sequence[dict[str, Any]] | None = None,
    num_images: int | None = None,
    topk: int = 100,
    vis: int = 0,
    mask_score: bool = True,
    per_category: bool = False,
    workers: int = 2,
    device: str | torch.device = "cpu",
    mask_threshold: float = 0.5,
    progress: bool = True,
    vis_score_threshold: float = 0.3,
    settings: dict[str, Any] | None = None,
    t_start: float | None = None,
    paste_on_device: bool | None = None,
) -> dict[str, Any]:
    """The evaluation loop over any iterable of batches (``collate_records`` format) with a loaded
    model and a pycocotools ``gt``; :func:`evaluate` is this over a cache. Same outputs and summary."""
    t_start = time.perf_counter() if t_start is None else t_start
    dev = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cats = categories or gt.loadCats(gt.getCatIds())
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    ann_name = str(annotations) if annotations is not None else "the annotation file"
    seg_results: list[dict[str, Any]] = []
    bbox_results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    vis_ids: list[int] = []
    t_model = t_wait = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_images, desc="evaluate", unit="img", leave=False)

    def collect(items):
        nonlocal t_wait
        t0 = time.perf_counter()
        for _, res in items:
            seg_results.extend(res)
        t_wait += time.perf_counter() - t0

    t_loop = time.perf_counter()
    with ResultPool(workers) as pool:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            for b, iid in enumerate(batch["image_id"].tolist()):
                img = gt.imgs.get(int(iid))
                if img is None:
                    raise MfdetrError(
                        f"cache image id {iid} is not in {ann_name}: the cache was extracted from another "
                        "annotation file (pass the matching --annotations)"
                    )
                hw = [int(v) for v in batch["orig_size"][b]]
                if "height" in img and "width" in img and [int(img["height"]), int(img["width"])] != hw:
                    raise MfdetrError(
                        f"image id {iid}: the cache says size {hw} (h, w) but {ann_name} says "
                        f"{[img['height'], img['width']]}: the cache and the annotation file do not match"
                    )
            jobs = image_jobs(model, batch, topk, mask_score, mask_threshold, dev, paste_on_device=paste_on_device)
            bbox_results.extend(box_results(batch, topk))
            t_model += time.perf_counter() - t0
            for job in jobs:
                image_ids.append(job["image_id"])
                if len(vis_ids) < vis:
                    vis_ids.append(job["image_id"])
                job.pop("det_scores", None)
                collect(pool.submit(job["image_id"], job))
            if bar is not None:
                bar.update(len(jobs))
        collect(pool.drain())
    if bar is not None:
        bar.close()
    t_masks = time.perf_counter() - t_loop
    if not image_ids:
        raise MfdetrError("nothing to evaluate: no images")

    segm_path, bbox_path = out / "results_segm.json", out / "results_bbox.json"
    with open(segm_path, "w") as f:
        json.dump(seg_results, f)
    with open(bbox_path, "w") as f:
        json.dump(bbox_results, f)

    t0 = time.perf_counter()
    segm = run_cocoeval(gt, seg_results, "segm", image_ids, topk, per_category)
    bbox = run_cocoeval(gt, bbox_results, "bbox", image_ids, topk, per_category)
    t_eval = time.perf_counter() - t0

    vis_files = []
    if vis_ids:
        from mfdetr.evaluate.overlays import save_overlay

        by_img: dict[int, list[dict[str, Any]]] = {i: [] for i in vis_ids}
        for r in seg_results:
            if r["image_id"] in by_img:
                by_img[r["image_id"]].append(r)
        for iid in vis_ids:
            info = gt.imgs[iid]
            path = _image_path(images_root, Path(annotations) if annotations else Path("."), info["file_name"])
            try:
                image = read_image(path)
            except (OSError, MfdetrError) as e:
                raise MfdetrError(f"cannot read image {path} (image id {iid}) for --vis: {e}") from e
            vis_files.append(
                str(save_overlay(out / "vis" / f"{iid}.png", image, by_img[iid], cat_names, vis_score_threshold))
            )

    total = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "segm": segm["stats"],
        "bbox": bbox["stats"],
        "num_images": len(image_ids),
        "num_detections": len(seg_results),
        "images_per_s": len(image_ids) / max(t_masks, 1e-9),
        "timing": {"masks_s": t_masks, "model_s": t_model, "encode_wait_s": t_wait, "cocoeval_s": t_eval, "total_s": total},
        "files": {"results_segm": str(segm_path), "results_bbox": str(bbox_path), "vis": vis_files},
        "settings": {
            **(settings or {}),
            "annotations": str(annotations) if annotations is not None else None,
            "topk": topk,
            "mask_score": mask_score,
            "mask_threshold": mask_threshold,
            "device": str(dev),
            "workers": workers,
        },
    }
    if per_category:
        summary["per_category"] = {"segm": segm["per_category"], "bbox": bbox["per_category"]}
        summary["categories"] = {str(k): v for k, v in cat_names.items()}
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    summary["files"]["summary"] = str(out / "summary.json")
    summary["table"] = format_table(summary, cat_names)
    if progress:
        print(summary["table"])
        print(
            f"{len(image_ids)} images, {len(seg_results)} masks, {summary['images_per_s']:.1f} images/s "
            f"(masks), COCOeval {t_eval:.1f} s -> {out}"
        )
    return summary
