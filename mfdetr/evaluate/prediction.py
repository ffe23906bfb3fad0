"""``mfdetr predict``: masks for new images, live: detector -> mask network -> paste -> RLE, no cache.

The same modules as evaluation: ``records_from_detections`` + ``collate_records`` build the batch the
mask network was trained on, :func:`mfdetr.evaluate.jobs.image_jobs` picks the boxes and scores,
:func:`mfdetr.evaluate.coco_results.image_results` pastes and encodes. On the same images (and the same
detector fingerprint) the masks equal ``evaluate``'s over a cache, up to the cache's storage dtype.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from mfdetr.evaluate.coco_results import image_results
from mfdetr.evaluate.jobs import image_jobs
from mfdetr.evaluate.meta import meta_categories, meta_detector
from mfdetr.evaluate.evaluation import read_image
from mfdetr.errors import MfdetrError

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


def predict(
    detector_spec: str | None,
    checkpoint: Path,
    images: Sequence[Path],
    out: Path,
    score_threshold: float = 0.3,
    topk: int = 100,
    device: str | torch.device = "cpu",
    mask_score: bool = True,
    categories: list[dict[str, Any]] | None = None,
    batch_size: int = 4,
    mask_threshold: float = 0.5,
    vis: bool = True,
    allow_detector_mismatch: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predict instance masks for ``images``; writes ``out/predictions.json`` and ``out/vis/*.png``.

    Args:
        detector_spec: detector spec (``hf:PATH``, ``shapes``, ``py:mod:fn``); None = the one the
            checkpoint records. It is built with the checkpoint's levels and top-k, so its fingerprint
            must equal the checkpoint's (else an error, or a warning with ``allow_detector_mismatch``).
        checkpoint: mask-network checkpoint.
        images: image files (folders are expanded to their image files).
        out: output folder.
        score_threshold: keep results whose final score is at least this.
        topk: at most this many results per image (best final score first).
        device: torch device of the detector and the mask network.
        mask_score: final score = detection score x predicted mask IoU (else the detection score).
        categories: ``[{id, name}]`` for label names and the detector's label mapping (default: the
            checkpoint's recorded dataset categories; without any, labels are shown as ids).
        batch_size: images per detector / mask-network batch.
        mask_threshold: probability threshold of the pasted masks.
        vis: write overlay PNGs.

    Returns:
        COCO-style results, one dict per mask: ``image_id`` (position in ``images``), ``file_name``,
        ``category_id``, ``category_name``, ``bbox`` (xywh), ``score``, ``det_score``,
        ``segmentation`` (RLE, counts as str).
    """
    from mfdetr.cache.batch import collate_records, records_from_detections
    from mfdetr.detectors.registry import build_detector
    from mfdetr.model.checkpoint import load_mask_net

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise MfdetrError(f"checkpoint {checkpoint} does not exist")
    paths = expand_images(images)
    dev = torch.device(device)
    model, meta = load_mask_net(checkpoint, map_location=dev)
    model = model.to(dev).eval()
    info = meta_detector(meta)
    spec = detector_spec or info["spec"]
    if not spec:
        raise MfdetrError(f"checkpoint {checkpoint} records no detector spec: pass --detector")
    cats = categories or meta_categories(meta)
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats or []}
    det_levels = [lv["name"] for lv in (info["detector_levels"] or info["levels"])] or None
    det_topk = int(info["topk"]) if info["topk"] else topk
    detector = build_detector(spec, categories=cats, device=str(dev), levels=det_levels, topk=det_topk)
    if info["fingerprint"] and detector.fingerprint != info["fingerprint"]:
        msg = (
            f"detector {spec!r} has fingerprint {detector.fingerprint[:12]} but checkpoint {checkpoint} was "
            f"trained on {info['spec']!r} with fingerprint {str(info['fingerprint'])[:12]} (other weights, "
            "preprocessing, levels or top-k): the masks will not be what the mask network learned"
        )
        if not allow_detector_mismatch:
            raise MfdetrError(msg + "; pass --allow-detector-mismatch to run anyway")
        warnings.warn(msg, stacklevel=2)
    missing = [d["name"] for d in info["levels"] if d["name"] not in {lv.name for lv in detector.levels}]
    if missing:
        raise MfdetrError(
            f"detector {spec!r} gives levels {[lv.name for lv in detector.levels]} but checkpoint {checkpoint} "
            f"reads level(s) {missing}"
        )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    used: set[str] = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="predict", unit="img", leave=False)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        imgs = []
        for p in chunk:
            try:
                im = read_image(p)
            except OSError as e:
                raise MfdetrError(f"cannot read image {p}: {e}") from e
            imgs.append(torch.as_tensor(im))
        outputs = detector.detect([im.to(dev) for im in imgs])
        records = records_from_detections([o.to("cpu") for o in outputs], topk=det_topk)
        for j, r in enumerate(records):
            r["index"] = r["image_id"] = start + j
        batch = collate_records(records, detector.levels)
        jobs = image_jobs(model, batch, topk, mask_score, mask_threshold, dev, score_threshold)
        for j, job in enumerate(jobs):
            path = chunk[j]
            n = len(job["scores"])
            job["extra"] = [
                {
                    "file_name": str(path),
                    "category_name": cat_names.get(int(job["labels"][k]), str(int(job["labels"][k]))),
                    "det_score": float(job["det_scores"][k]),
                }
                for k in range(n)
            ]
            res = image_results(job)
            results.extend(res)
            if vis:
                from mfdetr.evaluate.overlays import save_overlay

                save_overlay(out / "vis" / _overlay_name(path, used), imgs[j].numpy(), res, cat_names, score_threshold)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    with open(out / "predictions.json", "w") as f:
        json.dump(results, f)
    if progress:
        print(f"{len(paths)} images, {len(results)} masks -> {out / 'predictions.json'}", file=sys.stderr)
    return results
