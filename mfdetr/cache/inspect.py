"""``cache_info`` (sizes, progress, provenance) and ``verify`` (every done image decodes and is sane)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mfdetr.cache.floats import decode_float
from mfdetr.cache.guard import DamagedCacheError, check_blocks, describe
from mfdetr.cache.integrity import Layout, Problem
from mfdetr.cache.reader import CacheDataset, cache_meta, open_cache
from mfdetr.cache.schema import FEAT_GROUP, array_specs
from mfdetr.errors import MfdetrError


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
            rel = p[len(root.rstrip("/")) + 1 :] if p.startswith(root.rstrip("/")) else p
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
        total += 4.0 * int(lv.get("source_channels", lv["channels"])) * hw  # the detector's width
    return total


def _estimated_total(meta: dict[str, Any], done_sizes: np.ndarray, bpi: float | None) -> dict[str, Any]:
    """The whole dataset's cache size: measured bytes per done image x images (when some are done) and
    the schema's estimate under the cache's options (at the done images' mean input size, else padded)."""
    from mfdetr.cache.schema import estimate_image_bytes

    n = int(meta["dataset"]["num_images"])
    if len(done_sizes):
        hw = (int(round(float(done_sizes[:, 0].mean()))), int(round(float(done_sizes[:, 1].mean()))))
    else:
        lv0 = meta["detector"]["levels"][0]
        hw = tuple(int(v) * int(lv0["stride"]) for v in meta["padded"][lv0["name"]])
    est = estimate_image_bytes(
        meta["detector"]["levels"], hw, int(meta["detector"]["query_dim"]), meta["options"]
    )
    return {"images": n, "measured": None if bpi is None else bpi * n, "schema": est["total"] * n}


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
        "estimated_bytes_total": _estimated_total(meta, np.asarray(g["input_size"][:])[done & ~bad], bpi),
        "bytes_by_array": per,
        "detector": meta["detector"],
        "dataset": meta["dataset"],
        "levels": meta["detector"]["levels"],
        "options": meta["options"],
        "padded": meta["padded"],
    }


def _check_image(ds: CacheDataset, meta: dict[str, Any], i: int, cat_ids: set[int], raw: Any) -> list[str]:
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
        out.append(
            f"{where}: labels {sorted(set(int(v) for v in labels[:n]) - cat_ids)} are not dataset categories"
        )
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


@dataclass
class IntegrityReport:
    """``verify_report``'s answer: every problem, and how many images are done."""

    path: str
    images_total: int
    images_done: int
    images_bad: int
    quick: bool
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _with_ids(g: Any, layout: Layout, problems: list[Problem]) -> None:
    for p in problems:
        if p.positions is not None and p.image_ids is None:
            try:
                p.image_ids = [int(v) for v in np.asarray(g["image_id"][p.positions[0] : p.positions[1]])]
            except Exception:
                pass


def verify_report(path: Any, quick: bool = False, max_images: int | None = None) -> IntegrityReport:
    """Every problem of a cache: metadata files, array shapes, done blocks against their integrity
    manifest (``quick``: presence + sizes; else crc32c too), then (not ``quick``) every done image
    decodes and is sane (finite, sizes agree, zero padding, empty pad rows, ids increase), and a
    partial store (not every image done) is a problem too."""
    path = str(path)
    try:
        g = open_cache(path)
    except MfdetrError as e:
        return IntegrityReport(path, 0, 0, 0, quick, [Problem("metadata", str(e), key="zarr.json")])
    meta = cache_meta(g)
    n = int(meta["dataset"]["num_images"])
    rep = IntegrityReport(path, n, 0, 0, quick)
    for spec in array_specs(meta):
        try:
            a = g[spec.name]
        except KeyError:
            rep.problems.append(Problem("missing", "array is missing", spec.name))
            continue
        if tuple(a.shape) != spec.shape or np.dtype(a.dtype) != np.dtype(spec.dtype):
            rep.problems.append(
                Problem(
                    "metadata",
                    f"is {tuple(a.shape)} {a.dtype}, expected {spec.shape} {spec.dtype}",
                    spec.name,
                )
            )
    if rep.problems:
        return rep
    try:
        done = np.asarray(g["done"][:], bool)
        bad = np.asarray(g["bad"][:], bool)
    except Exception as e:
        rep.problems.append(Problem("decode", f"the done/bad flags cannot be read: {describe(e)}", "done"))
        return rep
    rep.images_done, rep.images_bad = int(done.sum()), int((done & bad).sum())
    checks = check_blocks(g, meta, done, bad)
    layout, blocks = checks.layout, checks.blocks
    rep.problems += checks.metadata
    if checks.manifest is None:
        rep.problems.append(
            Problem(
                "no-manifest",
                "no integrity manifest (written by an older mfdetr): missing "
                "objects read as zeros undetected; `mfdetr extract ... --repair` adds one",
            )
        )
    rep.problems += [blocks[b] for b in sorted(blocks)]
    objs = checks.object_problems(g.store, done, full=not quick)
    bad_blocks = set(blocks) | {p.block for p in objs if p.kind != "checksum"}
    images = [] if quick else _check_images(path, meta, done, bad, bad_blocks, layout.block, max_images)
    decoded_bad = {p.block for p in images}
    rep.problems += [p for p in objs if p.kind != "checksum" or p.block not in decoded_bad] + images
    _with_ids(g, layout, rep.problems)
    ids = np.asarray(g["image_id"][:]) if not blocks and not objs else None
    pos = np.flatnonzero(done)
    if ids is not None and len(pos) > 1 and (np.diff(ids[pos]) <= 0).any():
        j = int(np.flatnonzero(np.diff(ids[pos]) <= 0)[0])
        rep.problems.append(
            Problem(
                "content",
                f"image ids do not increase with position at positions {pos[j]}, {pos[j + 1]}",
                "image_id",
            )
        )
    if rep.images_done < n:
        rep.problems.append(
            Problem(
                "partial",
                f"only {rep.images_done} of {n} images are done: the extract is "
                "incomplete (rerun the same `mfdetr extract` to finish it)",
                "done",
            )
        )
    return rep


def _check_images(
    path: str,
    meta: dict[str, Any],
    done: np.ndarray,
    bad: np.ndarray,
    skip: set[Any],
    block: int,
    max_images: int | None,
) -> list[Problem]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CacheDataset(path, load_targets=True, skip_damaged=True)
    cat_ids = {int(c["id"]) for c in meta["dataset"].get("categories", [])}
    good = [int(i) for i in np.flatnonzero(done & ~bad) if i // block not in skip]
    if max_images is not None:
        good = good[:max_images]
    out = []
    for i in good:
        try:
            raw = ds.raw_at(i)
        except DamagedCacheError as e:
            msg = f"image position {i}: cannot read/decode: {str(e).split('; repair it with')[0]}"
            out.append(Problem("decode", msg, (e.arrays or [None])[0], i // block, (i, i + 1)))
            continue
        for msg in _check_image(ds, meta, i, cat_ids, raw):
            out.append(Problem("content", msg, None, i // block, (i, i + 1)))
    return out


def verify(path: Any, max_images: int | None = None, quick: bool = False) -> list[str]:
    """``verify_report``'s problems as lines (empty list = healthy and complete)."""
    return [str(p) for p in verify_report(path, quick=quick, max_images=max_images).problems]
