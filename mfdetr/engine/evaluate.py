"""``mfdetr evaluate``: COCO mask and box AP of a mask network over a (validation) cache.

Flow per batch of cache records: mask network (no detector, no image) -> per image, the top-``topk``
boxes by final score (detection score x predicted mask IoU with mask scoring) -> probabilities
``sigmoid(logits)`` -> paste into the original image only inside each box (per box in worker
processes on CPU; chunked on the device on GPU, see :mod:`mfdetr.engine.paste`) -> threshold -> RLE
(:mod:`mfdetr.engine.coco_results`). Worker processes take one image each, so no more than a few
images' masks ever exist at once. Then COCOeval (segm and bbox), the AP table, ``summary.json`` and
optional overlay PNGs.

Box results (``results_bbox.json``) are the frozen detector's own: the top-``topk`` valid boxes by
detection score, so the box AP is the detector's box AP on the cached boxes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from mfdetr.engine.coco_results import (
    ResultPool,
    format_table,
    load_coco,
    run_cocoeval,
    xyxy_to_xywh,
)
from mfdetr.engine.paste import paste_masks_torch
from mfdetr.errors import MfdetrError


# ------------------------------------------------------------------------------- checkpoint meta
def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def level_dicts(levels: Sequence[Any] | None) -> list[dict[str, Any]]:
    """LevelSpec objects or dicts -> ``[{name, stride, channels}]``."""
    out = []
    for lv in levels or []:
        out.append({"name": str(_get(lv, "name")), "stride": int(_get(lv, "stride")), "channels": int(_get(lv, "channels"))})
    return out


def meta_detector(meta: dict[str, Any]) -> dict[str, Any]:
    """The detector a checkpoint was trained on: ``{spec, fingerprint, levels, detector_levels, topk}``.

    Reads ``meta["detector"]`` (a dict as in the cache attributes) with top-level fallbacks
    (``detector_spec``, ``detector_fingerprint``, ``levels``, ``cache.options.topk``).
    """
    det = meta.get("detector") if isinstance(meta.get("detector"), dict) else {}
    cache = meta.get("cache") if isinstance(meta.get("cache"), dict) else {}
    options = cache.get("options") or meta.get("options") or {}
    return {
        "spec": det.get("spec") or meta.get("detector_spec"),
        "fingerprint": det.get("fingerprint") or meta.get("detector_fingerprint"),
        # the levels the mask network reads / the levels the detector was built with
        "levels": level_dicts(meta.get("levels") or det.get("levels")),
        "detector_levels": level_dicts(det.get("levels") or meta.get("levels")),
        "topk": det.get("topk") or options.get("topk") or meta.get("topk"),
    }


def meta_categories(meta: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The dataset categories a checkpoint recorded (``[{id, name}]``), if any."""
    for holder in (meta, meta.get("dataset") or {}, meta.get("cache") or {}, (meta.get("cache") or {}).get("dataset") or {}):
        cats = holder.get("categories") if isinstance(holder, dict) else None
        if cats:
            return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
    return None


def check_compatible(meta: dict[str, Any], cache_attrs: dict[str, Any], cache: str, checkpoint: Path) -> None:
    """Refuse a checkpoint trained on another detector (fingerprint) or on levels the cache lacks."""
    want = meta_detector(meta)
    have = cache_attrs.get("detector") or {}
    fp_c, fp_k = have.get("fingerprint"), want["fingerprint"]
    if fp_c and fp_k and fp_c != fp_k:
        raise MfdetrError(
            f"checkpoint {checkpoint} was trained on detector {want['spec']!r} (fingerprint {fp_k[:12]}) but "
            f"cache {cache} holds detector {have.get('spec')!r} (fingerprint {fp_c[:12]}): extract the "
            "validation cache with the checkpoint's detector and options"
        )
    cache_levels = {d["name"]: d for d in level_dicts(have.get("levels"))}
    for lv in want["levels"]:
        got = cache_levels.get(lv["name"])
        if cache_levels and (got is None or got["stride"] != lv["stride"] or got["channels"] != lv["channels"]):
            raise MfdetrError(
                f"checkpoint {checkpoint} needs feature level {lv} that cache {cache} does not hold as such "
                f"(cache levels: {list(cache_levels.values())}): extract the cache with the same levels"
            )


# ------------------------------------------------------------------------------------ mask net step
@torch.inference_mode()
def image_jobs(
    model: torch.nn.Module,
    batch: dict[str, Any],
    topk: int = 100,
    mask_score: bool = True,
    mask_threshold: float = 0.5,
    device: torch.device | str = "cpu",
    score_threshold: float | None = None,
    paste_on_device: bool | None = None,
) -> list[dict[str, Any]]:
    """Run the mask network on one batch and build one paste/encode job per image.

    Each job (see :func:`mfdetr.engine.coco_results.image_results`) holds the image's top-``topk``
    boxes by final score (``score_threshold`` then drops lower ones), their labels, final scores,
    detection scores and either box-frame probabilities (CPU: pasted later, in a worker) or
    thresholded crops (pasted here, chunked, when ``device`` is not the CPU; ``paste_on_device``
    overrides that choice).
    """
    from mfdetr.cache.batch import batch_to

    dev = torch.device(device)
    b_dev = batch_to(batch, dev)
    out = model(b_dev)
    rows = out["rows"].long()
    logits = out["mask_logits"]
    iou = out.get("iou_pred")
    det = b_dev["scores"][rows[:, 0], rows[:, 1]].float()
    if mask_score and iou is not None:
        final = det * iou.float().clamp(0.0, 1.0)
    else:
        final = det
    rows_c, final_c, det_c = rows.cpu(), final.cpu(), det.cpu()
    boxes_all = batch["boxes"].float()
    labels_all = batch["labels"]
    sizes = batch["orig_size"]
    jobs = []
    for b in range(int(batch["image_id"].shape[0])):
        sel = torch.nonzero(rows_c[:, 0] == b).flatten()
        order = torch.argsort(final_c[sel], descending=True, stable=True)[:topk]
        idx = sel[order]
        if score_threshold is not None:
            idx = idx[final_c[idx] >= score_threshold]
        ks = rows_c[idx, 1]
        h, w = int(sizes[b, 0]), int(sizes[b, 1])
        boxes = boxes_all[b, ks]
        job: dict[str, Any] = {
            "image_id": int(batch["image_id"][b]),
            "index": int(batch["index"][b]),
            "height": h,
            "width": w,
            "boxes": boxes.numpy().astype(np.float32),
            "labels": labels_all[b, ks].numpy().astype(np.int64),
            "scores": final_c[idx].numpy().astype(np.float64),
            "det_scores": det_c[idx].numpy().astype(np.float64),
            "threshold": float(mask_threshold),
        }
        probs = torch.sigmoid(logits[idx.to(logits.device)].float())
        on_device = dev.type != "cpu" if paste_on_device is None else paste_on_device
        if not on_device:
            job["probs"] = probs.cpu().numpy()
        else:
            job["crops"] = paste_masks_torch(probs, boxes.to(dev), h, w, mask_threshold)
        jobs.append(job)
    return jobs


def box_results(batch: dict[str, Any], topk: int = 100) -> list[dict[str, Any]]:
    """The detector's own box results: per image the top-``topk`` valid boxes by detection score."""
    out = []
    for b in range(int(batch["image_id"].shape[0])):
        valid = torch.nonzero(batch["valid"][b]).flatten()
        scores = batch["scores"][b, valid].float()
        ks = valid[torch.argsort(scores, descending=True, stable=True)[:topk]]
        xywh = xyxy_to_xywh(batch["boxes"][b, ks].float().numpy())
        for j, k in enumerate(ks.tolist()):
            out.append(
                {
                    "image_id": int(batch["image_id"][b]),
                    "category_id": int(batch["labels"][b, k]),
                    "bbox": [round(float(v), 3) for v in xywh[j]],
                    "score": float(batch["scores"][b, k]),
                }
            )
    return out


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
        from mfdetr.engine.visualize import save_overlay

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
