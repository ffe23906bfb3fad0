"""The embedded synthetic shapes dataset: ``make_synth`` writes COCO-format train and val splits.

Layout written under ``out``::

    out/train/annotations.json   COCO instances (info, images, annotations, categories)
    out/train/images/000000.png  file_name in the JSON is relative to images/
    out/val/...

Six categories (disc, square, triangle, star, ring, cross; ids 1..6) whose masks differ inside
similar boxes, occlusion (annotations hold the visible part; mostly hidden shapes are not drawn),
sizes over COCO's small/medium/large ranges, textured shapes over low-contrast clutter, 1 to 8
instances per image and about 4% of images with none. Every mask is stored as compressed RLE (exact;
rings and shapes cut by occluders have holes or several parts), bbox is the tight box of the visible
mask, area its pixel count, iscrowd 0.

Deterministic: each image is drawn from its own seed (see ``synth_shapes.render_image``), so the
files are byte-identical on a re-run whatever the number of workers, the first N train images of a
seed do not depend on how many are asked for, and val images come from another seed stream.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mfdetr.data.synth_shapes import CATEGORIES, render_image
from mfdetr.errors import MfdetrError
from mfdetr.utils.fs import disk_full_error, ensure_writable_dir, is_disk_full
from mfdetr.utils.progress import progress_bar

SYNTH_VERSION = 1
_NAME = re.compile(r"^\d{6,}\.png$")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of a [H,W] bool mask, counts as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _tight_box(mask: np.ndarray) -> list[float]:
    """COCO xywh of the tight box around a non-empty [H,W] bool mask."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] - x0 + 1), float(rows[-1] - y0 + 1)]


def _make_one(job: tuple[int, str, int, int, str]) -> tuple[int, list[dict[str, Any]]]:
    """Render image ``index``, write its PNG; returns (index, annotations without ids)."""
    seed, split, index, size, image_dir = job
    image, instances = render_image(seed, split, index, size)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    Path(image_dir, f"{index:06d}.png").write_bytes(buf.getvalue())
    anns = []
    for inst in instances:
        anns.append(
            {
                "image_id": index + 1,
                "category_id": inst.category_id,
                "segmentation": encode_mask(inst.mask),
                "area": int(inst.mask.sum()),
                "bbox": _tight_box(inst.mask),
                "iscrowd": 0,
            }
        )
    return index, anns


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``_make_one`` over ``jobs`` in order, in-process or with a pool of ``workers`` processes."""
    if workers <= 1 or len(jobs) < 32:
        yield from map(_make_one, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(_make_one, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))


def _clean_stale(image_dir: Path, count: int) -> None:
    """Remove synth-named PNGs of a previous, larger run (never other files)."""
    for p in image_dir.iterdir():
        if _NAME.match(p.name) and int(p.name[:-4]) >= count:
            p.unlink()


def make_split(
    out: Path,
    split: str,
    count: int,
    size: int = 192,
    seed: int = 0,
    workers: int = 1,
    on_image: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write one split (``out/annotations.json`` and ``out/images/``); returns its summary."""
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(image_dir, count)
    jobs = [(seed, split, j, size, str(image_dir)) for j in range(count)]
    images, annotations = [], []
    for index, anns in _run_jobs(jobs, workers):
        images.append({"id": index + 1, "file_name": f"{index:06d}.png", "height": size, "width": size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, **ann})
        if on_image is not None:
            on_image()
    dataset = {
        "info": {
            "description": "mfdetr synthetic shapes",
            "version": SYNTH_VERSION,
            "split": split,
            "seed": seed,
            "size": size,
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
    }
    ann_path = out / "annotations.json"
    ann_path.write_text(json.dumps(dataset, separators=(",", ":")))
    return {
        "annotations": str(ann_path),
        "images": str(image_dir),
        "num_images": len(images),
        "num_annotations": len(annotations),
    }


def make_synth(
    out: Path,
    train: int = 2000,
    val: int = 300,
    size: int = 192,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the synthetic dataset's ``out/train`` and ``out/val`` splits.

    Args:
        out: output folder (created; existing synth files in it are overwritten).
        train, val: number of images per split (>= 0).
        size: image side in pixels (square images, >= 32).
        seed: dataset seed; same seed -> identical bytes.
        workers: processes to render with (default: the CPU count, at most 8); the output does not
            depend on it.
        progress: show a tqdm bar.

    Returns:
        ``{"train": summary, "val": summary}``, summary = ``{annotations, images, num_images,
        num_annotations}`` (paths as str).
    """
    if train < 0 or val < 0:
        raise MfdetrError(f"synth: image counts must be >= 0 (got train={train}, val={val})")
    if size < 32:
        raise MfdetrError(f"synth: --size must be at least 32 px (got {size})")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    out = Path(out)
    ensure_writable_dir(out, "output folder")
    bar = None
    if progress:
        bar = progress_bar(total=train + val, desc="synth")
    try:
        result = {}
        for split, count in (("train", train), ("val", val)):
            on_image = bar.update if bar is not None else None
            result[split] = make_split(out / split, split, count, size, seed, workers, on_image)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(out, None, "writing the synthetic dataset to") from e
        raise
    finally:
        if bar is not None:
            bar.close()
    return result
