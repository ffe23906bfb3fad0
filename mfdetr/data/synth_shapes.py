"""Rendering of one synthetic shapes image with its visible instance masks (numpy + PIL only).

Every image is drawn from its own generator ``np.random.default_rng([seed, split_code, index])``, so
an image depends on nothing but (seed, split, index, size): the first N train images of a seed are the
same whatever the split size, and a pool of workers gives the same bytes as one process.

Scene: a low-contrast cluttered background (two-colour gradient, soft blobs, faint lines, pixel
noise), then 1 to 8 shapes painted in order, later ones covering earlier ones. A shape is kept only
if at least ``MIN_VISIBLE`` of its full area stays visible and it is not tiny; a dropped shape is not
painted at all, so every painted pixel of a shape belongs to an annotated instance.

Sizes are drawn per instance from three classes whose square-root-area ranges scale linearly with the
image size and, at 192 px, sit inside COCO's absolute small (< 32^2), medium and large (> 96^2) area
ranges, so COCOeval's APs / APm / APl are all defined on the default dataset.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ["disc", "square", "triangle", "star", "ring", "cross"]  # category id = position + 1
SPLIT_CODES = {"train": 0, "val": 1}
MIN_VISIBLE = 0.35  # keep an instance if visible area >= this fraction of its full area
REF_SIZE = 192  # image size at which the size classes below are given
# (probability, min sqrt(area), max sqrt(area)) at REF_SIZE px
SIZE_CLASSES = [(0.45, 9.0, 30.0), (0.42, 34.0, 90.0), (0.13, 102.0, 132.0)]
MIN_PIXELS = 24  # at REF_SIZE; smaller visible parts are dropped
EMPTY_FRACTION = 0.04  # fraction of images with no shape at all


@dataclass
class Instance:
    """One annotated shape: ``mask`` [H,W] bool is its visible part."""

    category_id: int
    mask: np.ndarray
    full_area: float


def _unit_polygon(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline [P,2] (and the hole's outline for a ring) of a shape in unit coordinates."""
    if name in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], 1)
        return circle, (circle * rng.uniform(0.45, 0.62) if name == "ring" else None)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), None
    if name == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), -np.sin(t)], 1), None
    if name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(t), -r * np.sin(t)], 1), None
    if name == "cross":
        w = rng.uniform(0.27, 0.36)
        q = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1)]
        pts = q + [(-x, -y) for x, y in q]
        return np.array(pts, float), None
    raise ValueError(name)


def _poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _place(outline: np.ndarray, hole: np.ndarray | None, area: float, rng: np.random.Generator):
    """Scale (to ``area``), stretch, rotate the unit outline; returns (outline, hole, full area, radius)."""
    unit_area = _poly_area(outline) - (_poly_area(hole) if hole is not None else 0.0)
    aspect = np.exp(rng.uniform(-0.22, 0.22))
    theta = rng.uniform(0, 2 * np.pi)
    k = np.sqrt(area / unit_area)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = rot @ np.diag([k * np.sqrt(aspect), k / np.sqrt(aspect)])
    outline = outline @ m.T
    hole = hole @ m.T if hole is not None else None
    return outline, hole, area, float(np.linalg.norm(outline, axis=1).max())


def _raster(outline: np.ndarray, hole: np.ndarray | None, center: np.ndarray, size: int) -> np.ndarray:
    """[H,W] bool mask of a polygon (minus its hole) centred at ``center`` (x, y)."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    draw.polygon([tuple(p) for p in (outline + center).tolist()], fill=1)
    if hole is not None:
        draw.polygon([tuple(p) for p in (hole + center).tolist()], fill=0)
    return np.asarray(im, dtype=bool)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """[H,W,3] float32 low-contrast clutter: gradient, soft blobs, faint lines."""
    c0 = _hsv(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.68))
    c1 = c0 + rng.uniform(-35, 35, 3).astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(a) * xx + np.sin(a) * yy) / size + 1) / 2  # in ~[0, 1]
    img = c0 + (c1 - c0) * t[..., None]
    nb = int(rng.integers(3, 9))  # soft blobs: separable Gaussians, summed at once
    c = rng.uniform(0, size, (nb, 2))
    sd = rng.uniform(0.04, 0.25, (nb, 2)) * size
    col = rng.uniform(-22, 22, (nb, 3)).astype(np.float32)
    ax = np.arange(size, dtype=np.float32)
    gx = np.exp(-0.5 * ((ax[None] - c[:, :1]) / sd[:, :1]) ** 2).astype(np.float32)  # [B,W]
    gy = np.exp(-0.5 * ((ax[None] - c[:, 1:]) / sd[:, 1:]) ** 2).astype(np.float32)  # [B,H]
    img += np.matmul(gx.T, gy.T[:, :, None] * col[None])  # [W,B] @ [H,B,3] -> [H,W,3]
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(1, 5)):  # faint lines
        p = rng.uniform(-0.1, 1.1, 4) * size
        fill = int(rng.integers(60, 256))
        draw.line([tuple(p[:2]), tuple(p[2:])], fill=fill, width=int(rng.integers(1, 3)))
    lines = np.asarray(layer, np.float32) / 255
    img += lines[..., None] * rng.uniform(-20, 20, 3).astype(np.float32)
    return img


def _texture(rng: np.random.Generator, color: np.ndarray, size: int, yy: np.ndarray, xx: np.ndarray):
    """[h,w,3] float32 fill of a shape (over the window ``yy``, ``xx`` [h,w]): its colour with one of
    flat / gradient / stripes / speckle."""
    kind = rng.integers(0, 4)
    if kind == 0:
        return np.broadcast_to(color, yy.shape + (3,))
    a = rng.uniform(0, 2 * np.pi)
    u = np.cos(a) * xx + np.sin(a) * yy
    if kind == 1:
        ramp = (u / size) * rng.uniform(20, 45)
        return color + ramp[..., None]
    if kind == 2:
        period = rng.uniform(4, 12) * size / REF_SIZE
        wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) * rng.uniform(8, 18)
        return color + wave[..., None]
    return color + rng.standard_normal(yy.shape + (1,), dtype=np.float32) * rng.uniform(6, 14)


def _shape_color(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A saturated colour at least some distance from the background mean and earlier shapes."""
    for _ in range(20):
        c = _hsv(rng.uniform(), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
        if all(np.linalg.norm(c - a) > (90 if i == 0 else 55) for i, a in enumerate(avoid)):
            break
    return c


def _sample_area(rng: np.random.Generator, scale: float, allow_large: bool) -> tuple[float, bool]:
    """A full area (px) from the size classes; also says whether it is from the large class."""
    classes = SIZE_CLASSES if allow_large else SIZE_CLASSES[:2]
    probs = np.array([p for p, _, _ in classes])
    c = int(rng.choice(len(classes), p=probs / probs.sum()))
    _, lo, hi = classes[c]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))) * scale) ** 2, c == 2


def render_image(seed: int, split: str, index: int, size: int = 192) -> tuple[np.ndarray, list[Instance]]:
    """Draw image ``index`` of ``split`` for ``seed``.

    Returns the image [H,W,3] uint8 RGB (H = W = size) and its kept instances in painting order, each
    with its visible mask [H,W] bool (exactly the pixels showing that shape in the image).
    """
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    scale = size / REF_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = _background(rng, size, yy, xx)
    n = 0 if rng.uniform() < EMPTY_FRACTION else int(rng.integers(1, 9))

    # plan the shapes: category, geometry, position
    plans = []
    large_seen = False
    for _ in range(n):
        cat = int(rng.integers(0, len(CATEGORIES)))
        area, large = _sample_area(rng, scale, allow_large=not large_seen)  # at most one large
        large_seen |= large
        outline, hole = _unit_polygon(CATEGORIES[cat], rng)
        outline, hole, full, radius = _place(outline, hole, area, rng)
        if plans and rng.uniform() < 0.35:  # next to an earlier shape, to overlap it
            prev = plans[int(rng.integers(0, len(plans)))]
            d = (prev[4] + radius) * rng.uniform(0.3, 0.9)
            a = rng.uniform(0, 2 * np.pi)
            center = prev[3] + d * np.array([np.cos(a), np.sin(a)])
        else:
            center = rng.uniform(0, size, 2)
        margin = min(radius * 0.75, size / 2)
        center = np.clip(center, margin, size - margin)
        plans.append((cat, outline, hole, center, radius, full))
    if plans and rng.uniform() < 0.5:  # half of the scenes paint big shapes first
        plans.sort(key=lambda p: -p[5])

    # keep from the top down: a shape's visible part is what no kept later shape covers
    min_px = MIN_PIXELS * scale * scale
    covered = np.zeros((size, size), bool)
    kept: list[tuple[int, np.ndarray, np.ndarray, float]] = []
    for cat, outline, hole, center, _, full in reversed(plans):
        m = _raster(outline, hole, center, size)
        vis = m & ~covered
        npx = int(vis.sum())
        if npx < min_px or npx < MIN_VISIBLE * full:
            continue
        rows, cols = np.any(vis, 1), np.any(vis, 0)
        if rows.sum() < 3 or cols.sum() < 3:
            continue
        kept.append((cat, m, vis, full))
        covered |= m
    kept.reverse()

    # paint bottom-up with the full masks of the kept shapes
    avoid = [img.reshape(-1, 3).mean(0)]
    instances = []
    for cat, m, vis, full in kept:
        color = _shape_color(rng, avoid)
        avoid.append(color)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        win = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        fill = _texture(rng, color, size, yy[win], xx[win])
        region = img[win]
        region[m[win]] = fill[m[win]]
        instances.append(Instance(category_id=cat + 1, mask=vis, full_area=full))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), instances
