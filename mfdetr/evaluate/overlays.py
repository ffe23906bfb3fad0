"""Overlay PNGs: masks with alpha, boxes, label names and scores, drawn with plain PIL."""

from __future__ import annotations

import colorsys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util


def color_for(category_id: int) -> tuple[int, int, int]:
    """A stable, well separated colour per category id (golden-ratio hue walk)."""
    h = (int(category_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _rle(seg: dict[str, Any]) -> dict[str, Any]:
    counts = seg["counts"]
    return {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def draw_overlay(
    image: np.ndarray,
    results: Sequence[dict[str, Any]],
    cat_names: dict[int, str] | None = None,
    score_threshold: float = 0.3,
    alpha: float = 0.45,
) -> Image.Image:
    """Draw COCO results (``segmentation`` RLE optional, ``bbox`` xywh, ``category_id``, ``score``).

    image: uint8 ``[3, H, W]`` (torch layout) or ``[H, W, 3]``. Results below ``score_threshold`` are
    skipped; masks are drawn lowest score first so the best ones end on top.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    canvas = img.astype(np.float32).copy()
    kept = sorted((r for r in results if r["score"] >= score_threshold), key=lambda r: r["score"])
    for r in kept:
        seg = r.get("segmentation")
        if seg is None:
            continue
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_util.decode(_rle(seg)).astype(bool)
        if m.shape != canvas.shape[:2]:
            continue
        c = np.array(color_for(r["category_id"]), np.float32)
        canvas[m] = (1 - alpha) * canvas[m] + alpha * c
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    size = int(max(8, min(16, min(out.size) // 24)))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    for r in kept:
        x, y, w, h = r["bbox"]
        c = color_for(r["category_id"])
        draw.rectangle([x, y, x + w, y + h], outline=c, width=2)
        name = (cat_names or {}).get(int(r["category_id"]), str(r["category_id"]))
        text = f"{name} {r['score']:.2f}"
        tx, ty = x, max(y - size - 3, 0)
        left, t, rr, bb = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([left - 1, t - 1, rr + 1, bb + 1], fill=c)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    return out


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    results: Sequence[dict[str, Any]],
    cat_names: dict[int, str] | None = None,
    score_threshold: float = 0.3,
) -> Path:
    """:func:`draw_overlay` saved as a PNG at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, results, cat_names, score_threshold).save(path)
    return path
