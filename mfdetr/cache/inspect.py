"""``cache_info`` (sizes, progress, provenance) and ``verify`` (every done image decodes and is sane)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mfdetr.cache.reader import CacheDataset, cache_meta, open_cache
from mfdetr.cache.schema import FEAT_GROUP, array_specs
from mfdetr.cache.writer import decode_float


def _disk_usage(path: str) -> tuple[int | None, dict[str, int]]:
    """(total bytes, bytes per top-level entry) of a store; (None, {}) where the store cannot be listed."""
    if str(path).startswith(("http://", "https://")):
        return None, {}
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        per: dict[str, int] = {}
        total = 0
        for p, info in fs.find(root, detail=True).items():
            size = int(info.get("size") or 0)
            total += size
            rel = p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/")) else p
            parts = rel.split("/")
            key = "/".join(parts[:2]) if parts[0] == FEAT_GROUP and len(parts) > 2 else parts[0]
            per[key] = per.get(key, 0) + size
        return total, per
    except Exception:  # http without listing, permissions, ...
        return None, {}


def raw_float32_bytes(meta: dict[str, Any], feat_sizes: np.ndarray | None = None) -> float:
    """Bytes per image of the detector's outputs as raw float32: feature maps at their true size
    (mean over ``feat_sizes`` [n, L, 2] when given, else the padded size) plus the K x D queries."""
    k = int(meta["options"]["topk"])
    d = int(meta["detector"]["query_dim"])
    total = 4.0 * k * d
    for li, lv in enumerate(meta["detector"]["levels"]):
        if feat_sizes is not None and len(feat_sizes):
            hw = float(np.mean(feat_sizes[:, li, 0].astype(np.float64) * feat_sizes[:, li, 1]))
        else:
            h, w = meta["padded"][lv["name"]]
            hw = float(h * w)
        total += 4.0 * int(lv["channels"]) * hw
    return total


def cache_info(path: Any) -> dict[str, Any]:
    """Progress, sizes and provenance of a cache.

    Keys: path, fingerprint, schema_version, mfdetr_version, images_total, images_done, images_bad,
    bytes_on_disk (None when the store cannot be listed, e.g. plain http), bytes_per_image
    (bytes_on_disk / done images), raw_float32_per_image (features at true size + queries as
    float32), ratio_to_raw_float32, bytes_by_array, detector, dataset, levels, options, padded.
    """
    path = str(path)
    g = open_cache(path)
    meta = cache_meta(g)
    done = np.asarray(g["done"][:], bool)
    bad = np.asarray(g["bad"][:], bool)
    n_done = int((done & ~bad).sum())
    sizes = np.asarray(g["feat_size"][:])[done & ~bad] if n_done else None
    total, per = _disk_usage(path)
    raw = raw_float32_bytes(meta, sizes)
    bpi = (total / n_done) if (total is not None and n_done) else None
    return {
        "path": path,
        "fingerprint": meta["fingerprint"],
        "schema_version": meta["schema_version"],
        "mfdetr_version": meta.get("mfdetr_version"),
        "images_total": int(meta["dataset"]["num_images"]),
        "images_done": int(done.sum()),
        "images_bad": int((done & bad).sum()),
        "bytes_on_disk": total,
        "bytes_per_image": bpi,
        "raw_float32_per_image": raw,
        "ratio_to_raw_float32": (bpi / raw) if bpi else None,
        "bytes_by_array": per,
        "detector": meta["detector"],
        "dataset": meta["dataset"],
        "levels": meta["detector"]["levels"],
        "options": meta["options"],
        "padded": meta["padded"],
    }


def _check_image(ds: CacheDataset, meta: dict[str, Any], i: int, cat_ids: set[int]) -> list[str]:
    where = f"image position {i}"
    try:
        raw = ds.raw_at(i)
    except Exception as e:
        return [f"{where}: cannot read/decode: {type(e).__name__}: {e}"]
    where = f"image position {i} (id {int(raw['image_id'])})"
    out: list[str] = []
    k = int(meta["options"]["topk"])
    dtype = meta["options"]["dtype"]
    n = int(raw["num_boxes"])
    if not 0 <= n <= k:
        out.append(f"{where}: num_boxes {n} outside 0..{k}")
        n = max(0, min(n, k))
    for name in ("boxes", "scores", "match_iou", "scale"):
        if not np.isfinite(np.asarray(raw[name], np.float64)).all():
            out.append(f"{where}: {name} has non-finite values")
    labels = np.asarray(raw["labels"])
    if (labels[n:] != -1).any():
        out.append(f"{where}: labels beyond num_boxes are not -1")
    if cat_ids and not set(int(v) for v in labels[:n]) <= cat_ids:
        out.append(f"{where}: labels {sorted(set(int(v) for v in labels[:n]) - cat_ids)} are not dataset categories")
    q = decode_float(np.asarray(raw["queries"]), dtype)
    if not bool(q.isfinite().all()):
        out.append(f"{where}: queries have non-finite values")
    hin, win = (int(v) for v in raw["input_size"])
    sizes = np.asarray(raw["feat_size"])
    for li, lv in enumerate(meta["detector"]["levels"]):
        name = lv["name"]
        h, w = int(sizes[li, 0]), int(sizes[li, 1])
        ph, pw = meta["padded"][name]
        if not (1 <= h <= ph and 1 <= w <= pw):
            out.append(f"{where}: level {name} true size {(h, w)} outside 1..{(ph, pw)}")
            continue
        exp = (math.ceil(hin / lv["stride"]), math.ceil(win / lv["stride"]))
        if (h, w) != exp:
            out.append(f"{where}: level {name} size {(h, w)} != ceil(input_size / stride) {exp}")
        f = decode_float(np.asarray(raw[f"{FEAT_GROUP}/{name}"]), dtype)
        if not bool(f[:, :h, :w].isfinite().all()):
            out.append(f"{where}: level {name} has non-finite values")
        if bool(f[:, h:, :].any()) or bool(f[:, :, w:].any()):
            out.append(f"{where}: level {name} padding is not zero")
    mid = np.asarray(raw["match_ann_id"])
    miou = np.asarray(raw["match_iou"])
    masks = np.asarray(raw["mask_targets"])
    if (mid[n:] != -1).any():
        out.append(f"{where}: match_ann_id beyond num_boxes is not -1")
    none = mid < 0
    if (miou[none] != 0).any() or masks[none].any():
        out.append(f"{where}: unmatched boxes have a non-zero match_iou or mask target")
    if ((miou[~none] <= 0) | (miou[~none] > 1 + 1e-6)).any():
        out.append(f"{where}: match_iou of matched boxes outside (0, 1]")
    return out


def verify(path: Any, max_images: int | None = None) -> list[str]:
    """Problems found in a cache (empty list = healthy): array shapes/dtypes against the schema, and
    for every done image (or the first ``max_images``): it decodes, values are finite, sizes agree,
    padding is zero, padded rows are empty, image ids increase with the position."""
    path = str(path)
    problems: list[str] = []
    g = open_cache(path)
    meta = cache_meta(g)
    for spec in array_specs(meta):
        try:
            a = g[spec.name]
        except KeyError:
            problems.append(f"array {spec.name} is missing")
            continue
        if tuple(a.shape) != spec.shape or np.dtype(a.dtype) != np.dtype(spec.dtype):
            problems.append(f"array {spec.name} is {tuple(a.shape)} {a.dtype}, expected {spec.shape} {spec.dtype}")
    if problems:
        return problems
    ds = CacheDataset(path, load_targets=True)
    done = np.asarray(g["done"][:], bool)
    bad = np.asarray(g["bad"][:], bool)
    ids = np.asarray(g["image_id"][:])
    pos = np.flatnonzero(done)
    if len(pos) > 1:
        d = np.diff(ids[pos])
        if (d <= 0).any():
            j = int(np.flatnonzero(d <= 0)[0])
            problems.append(f"image ids do not increase with position at positions {pos[j]}, {pos[j + 1]}")
    cat_ids = {int(c["id"]) for c in meta["dataset"].get("categories", [])}
    good = np.flatnonzero(done & ~bad)
    if max_images is not None:
        good = good[:max_images]
    for i in good:
        problems += _check_image(ds, meta, int(i), cat_ids)
    return problems
