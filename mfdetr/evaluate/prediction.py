"""``mfdetr predict``: masks for new images, live: detector -> mask network -> paste -> RLE, no cache.

The same modules as evaluation: ``records_from_detections`` + ``collate_records`` build the batch the
mask network was trained on, :func:`mfdetr.evaluate.jobs.image_jobs` picks the boxes and scores,
:func:`mfdetr.evaluate.coco_results.image_results` pastes and encodes. On the same images (and the same
detector fingerprint) the masks equal ``evaluate``'s over a cache, up to the cache's storage dtype.
Unreadable images stop the run with an error naming the file, or, with ``skip_bad``, are skipped and
listed in :attr:`PredictResult.skipped`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfdetr.cache.storage import project_features, unpack_projection
from mfdetr.data.image_io import load_image
from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.evaluate.coco_results import image_results
from mfdetr.evaluate.config import PredictConfig, write_json
from mfdetr.evaluate.jobs import image_jobs
from mfdetr.evaluate.meta import meta_categories, meta_detector
from mfdetr.utils.fs import ensure_writable_dir
from mfdetr.utils.progress import progress_bar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders -> their image files (sorted, not recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise MfdetrError(f"image {p} does not exist")
    if not out:
        raise MfdetrError(f"no images found in {[str(p) for p in paths]}")
    return out


def _overlay_name(path: Path, used: set[str]) -> str:
    name = path.stem
    k = 1
    while name in used:
        k += 1
        name = f"{path.stem}-{k}"
    used.add(name)
    return name + ".png"


@dataclass
class PredictResult:
    """What ``predict`` wrote: ``results`` (also ``predictions.json``) are COCO-style dicts, one per mask:
    ``image_id`` (position of the image in the expanded input list), ``file_name``, ``category_id``,
    ``category_name``, ``bbox`` (xywh), ``score``, ``det_score``, ``segmentation`` (RLE, counts as str).
    ``skipped``: ``(file, reason)`` of the unreadable images skipped with ``skip_bad``."""

    results: list[dict[str, Any]]
    num_images: int
    files: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _build(checkpoint: Path, detector_spec: str | None, categories, cfg: PredictConfig):
    """The mask network and the detector it was trained on (fingerprint and levels checked)."""
    from mfdetr.detectors.registry import build_detector
    from mfdetr.model.checkpoint import checkpoint_label_map, load_mask_net

    dev = torch.device(cfg.device)
    model, meta = load_mask_net(checkpoint, map_location=dev)
    model = model.to(dev).eval()
    info = meta_detector(meta)
    spec = detector_spec or info["spec"]
    if not spec:
        raise MfdetrError(f"checkpoint {checkpoint} records no detector spec: pass --detector")
    cats = categories or meta_categories(meta)
    det_levels = [lv["name"] for lv in (info["detector_levels"] or info["levels"])] or None
    det_topk = int(info["topk"]) if info["topk"] else cfg.topk
    # the label map of the cache's detector (part of its fingerprint), for that same detector only
    label_map = checkpoint_label_map(meta) if spec == info["spec"] else None
    detector = build_detector(
        spec, categories=cats, device=str(dev), levels=det_levels, topk=det_topk, label_map=label_map
    )
    if info["fingerprint"] and detector.fingerprint != info["fingerprint"]:
        msg = (
            f"detector {spec!r} has fingerprint {detector.fingerprint[:12]} but checkpoint {checkpoint} was "
            f"trained on {info['spec']!r} with fingerprint {str(info['fingerprint'])[:12]} (other weights, "
            "preprocessing, levels or top-k): the masks will not be what the mask network learned"
        )
        if not cfg.allow_detector_mismatch:
            raise MfdetrError(msg + "; pass --allow-detector-mismatch to run anyway")
        warnings.warn(msg, stacklevel=3)
    missing = [d["name"] for d in info["levels"] if d["name"] not in {lv.name for lv in detector.levels}]
    if missing:
        raise MfdetrError(
            f"detector {spec!r} gives levels {[lv.name for lv in detector.levels]} but checkpoint "
            f"{checkpoint} reads level(s) {missing}"
        )
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats or []}
    return model, detector, det_topk, cat_names, meta.get("projection")


def _levels(levels: Sequence[LevelSpec], bases: dict[str, tuple[Any, Any]]) -> list[LevelSpec]:
    """The detector's levels as the network reads them: projected ones at their projected width."""
    return [
        LevelSpec(lv.name, lv.stride, int(bases[lv.name][1].shape[1])) if lv.name in bases else lv
        for lv in levels
    ]


def _read(
    paths: Sequence[Path], skip_bad: bool, skipped: list[tuple[str, str]]
) -> list[tuple[int, Path, Any]]:
    """(position, path, [3,H,W] tensor) of the readable images; the others stop the run or are skipped."""
    out = []
    for pos, p in paths:
        try:
            out.append((pos, p, load_image(p, what=str(p))))
        except MfdetrError as e:
            if not skip_bad:
                raise
            skipped.append((str(p), str(e)))
    return out


def predict(
    checkpoint: Path,
    images: Sequence[str | Path],
    out: Path,
    cfg: PredictConfig | None = None,
    detector: str | None = None,
    categories: list[dict[str, Any]] | None = None,
) -> PredictResult:
    """Predict instance masks for ``images`` (files; folders expand to their image files); writes
    ``out/predictions.json`` and, with ``cfg.vis``, ``out/vis/*.png``.

    ``detector``: a spec (``hf:PATH``, ``shapes``, ``py:mod:fn``); None = the one the checkpoint records.
    It is built with the checkpoint's levels and top-k, so its fingerprint must equal the checkpoint's.
    ``categories``: ``[{id, name}]`` for label names and the detector's label mapping (default: the
    checkpoint's recorded dataset categories).
    """
    from mfdetr.cache.batch import collate_records, records_from_detections
    from mfdetr.evaluate.overlays import save_overlay

    cfg = (cfg or PredictConfig()).validate()
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise MfdetrError(f"checkpoint {checkpoint} does not exist")
    paths = expand_images(images)
    out = Path(out)
    ensure_writable_dir(out, "--out")
    model, det, det_topk, cat_names, projection = _build(checkpoint, detector, categories, cfg)
    bases = unpack_projection(projection)  # decoded once, applied to every image
    levels = _levels(det.levels, bases)
    dev = torch.device(cfg.device)
    results: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    vis_files: list[str] = []
    used: set[str] = set()
    bar = progress_bar(total=len(paths), desc="predict", unit="img", enabled=cfg.progress)
    indexed = list(enumerate(paths))
    for start in range(0, len(indexed), cfg.batch_size):
        chunk = _read(indexed[start : start + cfg.batch_size], cfg.skip_bad, skipped)
        bar.update(min(cfg.batch_size, len(indexed) - start))
        if not chunk:
            continue
        outputs = det.detect([im.to(dev) for _, _, im in chunk])
        outputs = [o.to("cpu") for o in outputs]
        for o in outputs:  # a projected train cache: the network reads the maps in its PCA bases
            o.features = project_features(o.features, bases)
        records = records_from_detections(outputs, topk=det_topk)
        for (pos, _, _), r in zip(chunk, records):
            r["index"] = r["image_id"] = pos
        batch = collate_records(records, levels)
        jobs = image_jobs(
            model, batch, cfg.topk, cfg.mask_score, cfg.mask_threshold, dev, cfg.score_threshold
        )
        for (_, path, im), job in zip(chunk, jobs):
            labels = [int(v) for v in job["labels"]]
            job["extra"] = [
                {"file_name": str(path), "category_name": cat_names.get(lab, str(lab)), "det_score": float(d)}
                for lab, d in zip(labels, job["det_scores"])
            ]
            res = image_results(job)
            results.extend(res)
            if cfg.vis:
                target = out / "vis" / _overlay_name(path, used)
                vis_files.append(str(save_overlay(target, im.numpy(), res, cat_names, cfg.score_threshold)))
    bar.close()
    pred_file = write_json(out / "predictions.json", results)
    warns = [f"skipped unreadable image {f}: {why}" for f, why in skipped]
    files = {"predictions": str(pred_file), "vis": vis_files}
    return PredictResult(results, len(paths) - len(skipped), files, skipped, warns)
