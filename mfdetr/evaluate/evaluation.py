"""``mfdetr evaluate``: COCO mask, box, Boundary and occluded-instance AP of a mask network over a cache.

Flow per batch of cache records: mask network (no detector, no image) -> per image, the top-``topk``
boxes by final score (detection score x predicted mask IoU with mask scoring) -> probabilities
``sigmoid(logits)`` -> paste into the original image only inside each box (per box in worker
processes on CPU; chunked on the device on GPU, see :mod:`mfdetr.evaluate.paste`) -> threshold -> RLE
(:mod:`mfdetr.evaluate.coco_results`). Worker processes take one image each, so no more than a few
images' masks ever exist at once. Then COCOeval (:mod:`mfdetr.evaluate.coco_eval`), ``summary.json``
and optional overlay PNGs. The result is an :class:`EvalResult`; the CLI prints its table.

Box results (``results_bbox.json``) are the frozen detector's own: the top-``topk`` valid boxes by
detection score, so the box AP is the detector's box AP on the cached boxes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfdetr.errors import MfdetrError
from mfdetr.evaluate.coco_eval import EvalMetrics, evaluate_results, format_table
from mfdetr.evaluate.coco_results import ResultPool
from mfdetr.evaluate.config import EvalConfig, write_json
from mfdetr.evaluate.gt import GroundTruth, load_ground_truth
from mfdetr.evaluate.jobs import box_results, image_jobs
from mfdetr.evaluate.meta import check_compatible
from mfdetr.utils.fs import ensure_writable_dir
from mfdetr.utils.progress import progress_bar


@dataclass
class EvalResult:
    """What ``evaluate`` measured and wrote. APs are COCO fractions in [0, 1] (None where undefined)."""

    metrics: EvalMetrics
    num_images: int
    num_detections: int
    images_per_s: float
    timing: dict[str, float]
    files: dict[str, Any]
    settings: dict[str, Any]
    categories: dict[int, str]
    warnings: list[str] = field(default_factory=list)

    @property
    def mask_ap(self) -> float | None:
        return self.metrics.segm.ap

    @property
    def box_ap(self) -> float | None:
        return self.metrics.bbox.ap

    @property
    def boundary_ap(self) -> float | None:
        return self.metrics.boundary.ap if self.metrics.boundary is not None else None

    @property
    def occluded_ap(self) -> float | None:
        return self.metrics.occluded.ap if self.metrics.occluded is not None else None

    def table(self) -> str:
        """The AP table the CLI prints."""
        return format_table(self.metrics, self.categories)

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` content (stats dicts per metric, the four APs at the top level)."""
        m = self.metrics
        out: dict[str, Any] = {
            "mask_ap": self.mask_ap,
            "box_ap": self.box_ap,
            "boundary_ap": self.boundary_ap,
            "occluded_ap": self.occluded_ap,
            "segm": m.segm.stats,
            "bbox": m.bbox.stats,
            "boundary": m.boundary.stats if m.boundary is not None else None,
            "occluded": m.occluded.stats if m.occluded is not None else None,
            "num_occluded": m.num_occluded,
            "evaluator": m.evaluator,
            "degenerate_annotations": m.degenerate,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "images_per_s": self.images_per_s,
            "timing": self.timing,
            "files": self.files,
            "settings": self.settings,
            "warnings": self.warnings,
        }
        if m.segm.per_category is not None:
            out["per_category"] = {"segm": m.segm.per_category, "bbox": m.bbox.per_category}
            out["categories"] = {str(k): v for k, v in self.categories.items()}
        return out


def degenerate_warning(gt: GroundTruth) -> list[str]:
    """The warning line for the degenerate annotations, naming them by id (the shared wording)."""
    from mfdetr.data.annotations import describe_degenerate

    if not gt.degenerate:
        return []
    return [
        f"{gt.name}: {describe_degenerate(gt.degenerate)} In evaluation they are ignored regions (their "
        "boxes): a detection on one is neither a true nor a false positive."
    ]


def _default_out(checkpoint: Path) -> Path:
    parent = checkpoint.resolve().parent  # <run dir>/eval for <run dir>/checkpoints/last.pt
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def evaluate(
    cache: str,
    checkpoint: Path,
    cfg: EvalConfig | None = None,
    annotations: Path | None = None,
    out: Path | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` on the done images of ``cache`` (see :class:`EvalConfig` for the options).

    ``annotations``: the COCO ground truth (default: the file the cache was extracted from); ``out``:
    the output folder (default ``<run dir>/eval`` for ``<run dir>/checkpoints/X.pt``, else
    ``<checkpoint dir>/eval``) for ``results_segm.json``, ``results_bbox.json``, ``summary.json``, ``vis/``.
    """
    from mfdetr.cache.reader import CacheDataset
    from mfdetr.model.checkpoint import load_mask_net

    t_start = time.perf_counter()
    cfg = (cfg or EvalConfig()).validate()
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise MfdetrError(f"checkpoint {checkpoint} does not exist")
    out = Path(out) if out is not None else _default_out(checkpoint)
    ensure_writable_dir(out, "--out")
    ds = CacheDataset(cache, load_targets=False)
    dataset_attrs = ds.attrs.get("dataset") or {}
    if annotations is None:
        if not dataset_attrs.get("annotations"):
            raise MfdetrError(f"cache {cache} records no annotation file: pass --annotations")
        annotations = Path(dataset_attrs["annotations"])
    gt = load_ground_truth(annotations)
    dev = torch.device(cfg.device)
    model, meta = load_mask_net(checkpoint, map_location=dev)
    check_compatible(meta, ds.attrs, str(cache), checkpoint)
    model = model.to(dev).eval()
    if len(ds) == 0:
        raise MfdetrError(f"cache {cache} has no finished (done) images to evaluate")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=False, collate_fn=ds.collate, num_workers=0
    )
    return evaluate_batches(
        model,
        loader,
        gt,
        out,
        cfg,
        images_root=dataset_attrs.get("images"),
        categories=dataset_attrs.get("categories"),
        num_images=len(ds),
        settings={"cache": str(cache), "checkpoint": str(checkpoint)},
        t_start=t_start,
    )


def _check_images(batch: dict[str, Any], gt: GroundTruth) -> None:
    for b, iid in enumerate(batch["image_id"].tolist()):
        img = gt.imgs.get(int(iid))
        if img is None:
            raise MfdetrError(
                f"cache image id {iid} is not in {gt.name}: the cache was extracted from another "
                "annotation file (pass the matching --annotations)"
            )
        hw = [int(v) for v in batch["orig_size"][b]]
        if [int(img["height"]), int(img["width"])] != hw:
            raise MfdetrError(
                f"image id {iid}: the cache says size {hw} (h, w) but {gt.name} says "
                f"{[img['height'], img['width']]}: the cache and the annotation file do not match"
            )


@dataclass
class _Collected:
    segm: list[dict[str, Any]] = field(default_factory=list)
    bbox: list[dict[str, Any]] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    t_model: float = 0.0
    t_wait: float = 0.0
    t_masks: float = 0.0


def _infer(
    model,
    batches: Iterable[dict[str, Any]],
    gt: GroundTruth,
    cfg: EvalConfig,
    num_images: int | None,
    paste_on_device: bool | None,
) -> _Collected:
    """The mask network over every batch, pasting and encoding in worker processes."""
    c = _Collected()
    dev = torch.device(cfg.device)
    bar = progress_bar(total=num_images, desc="evaluate", unit="img", enabled=cfg.progress)

    def collect(items) -> None:
        t0 = time.perf_counter()
        for _, res in items:
            c.segm.extend(res)
        c.t_wait += time.perf_counter() - t0

    t_loop = time.perf_counter()
    with ResultPool(cfg.workers) as pool:
        for batch in batches:
            t0 = time.perf_counter()
            _check_images(batch, gt)
            jobs = image_jobs(
                model,
                batch,
                cfg.topk,
                cfg.mask_score,
                cfg.mask_threshold,
                dev,
                paste_on_device=paste_on_device,
            )
            c.bbox.extend(box_results(batch, cfg.topk))
            c.t_model += time.perf_counter() - t0
            for job in jobs:
                c.image_ids.append(job["image_id"])
                job.pop("det_scores", None)
                collect(pool.submit(job["image_id"], job))
            bar.update(len(jobs))
        collect(pool.drain())
    bar.close()
    c.t_masks = time.perf_counter() - t_loop
    return c


def _image_path(images_root: str | None, gt: GroundTruth, file_name: str) -> Path:
    p = Path(file_name)
    if p.is_absolute():
        return p
    root = Path(images_root) if images_root else (gt.path.parent if gt.path is not None else Path("."))
    return root / p


def _overlays(
    out: Path,
    gt: GroundTruth,
    c: _Collected,
    cfg: EvalConfig,
    images_root: str | None,
    cat_names: dict[int, str],
) -> list[str]:
    from mfdetr.data.image_io import load_image
    from mfdetr.evaluate.overlays import save_overlay

    vis_ids = c.image_ids[: cfg.vis]
    by_img: dict[int, list[dict[str, Any]]] = {i: [] for i in vis_ids}
    for r in c.segm:
        if r["image_id"] in by_img:
            by_img[r["image_id"]].append(r)
    files = []
    for iid in vis_ids:
        path = _image_path(images_root, gt, gt.imgs[iid]["file_name"])
        try:
            image = load_image(Path(path), what=f"image id {iid} (for --vis)").numpy()
        except MfdetrError as e:
            raise MfdetrError(f"{e} (or pass --vis 0)") from None
        try:
            saved = save_overlay(
                out / "vis" / f"{iid}.png", image, by_img[iid], cat_names, cfg.vis_score_threshold
            )
        except OSError as e:
            raise MfdetrError(
                f"cannot write overlay {out / 'vis' / f'{iid}.png'}: {e.strerror or e}"
            ) from None
        files.append(str(saved))
    return files


def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    gt: GroundTruth,
    out: Path,
    cfg: EvalConfig | None = None,
    images_root: str | None = None,
    categories: Sequence[dict[str, Any]] | None = None,
    num_images: int | None = None,
    settings: dict[str, Any] | None = None,
    t_start: float | None = None,
    paste_on_device: bool | None = None,
) -> EvalResult:
    """The evaluation over any iterable of batches (``collate_records`` format) with a loaded model and
    a :class:`GroundTruth`; :func:`evaluate` is this over a cache. Writes the results JSONs,
    ``summary.json`` and the overlays to ``out``."""
    t_start = time.perf_counter() if t_start is None else t_start
    cfg = (cfg or EvalConfig()).validate()
    out = Path(out)
    ensure_writable_dir(out, "--out")
    cats = categories or gt.categories()
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    c = _infer(model, batches, gt, cfg, num_images, paste_on_device)
    if not c.image_ids:
        raise MfdetrError("nothing to evaluate: no images")
    files: dict[str, Any] = {
        "results_segm": str(write_json(out / "results_segm.json", c.segm)),
        "results_bbox": str(write_json(out / "results_bbox.json", c.bbox)),
    }
    t0 = time.perf_counter()
    metrics = evaluate_results(
        gt,
        c.segm,
        c.bbox,
        c.image_ids,
        cfg.topk,
        cfg.per_category,
        cfg.evaluator,
        threads=max(1, cfg.workers),
        boundary=cfg.boundary,
    )
    t_eval = time.perf_counter() - t0
    files["vis"] = _overlays(out, gt, c, cfg, images_root, cat_names) if cfg.vis else []
    timing = {"masks_s": c.t_masks, "model_s": c.t_model, "encode_wait_s": c.t_wait, "cocoeval_s": t_eval}
    run_settings = {
        **(settings or {}),
        "annotations": str(gt.path) if gt.path is not None else None,
        **{k: v for k, v in vars(cfg).items() if k != "progress"},
    }
    result = EvalResult(
        metrics,
        len(c.image_ids),
        len(c.segm),
        len(c.image_ids) / max(c.t_masks, 1e-9),
        timing,
        files,
        run_settings,
        cat_names,
        degenerate_warning(gt),
    )
    result.files["summary"] = str(out / "summary.json")
    result.timing["total_s"] = time.perf_counter() - t_start
    write_json(out / "summary.json", result.summary(), indent=2)
    return result
