"""Dry run of a pipeline: check every path and estimate the cache budget before extracting anything.

The estimate uses the detector's own levels and resize rule (``FrozenDetector.input_size``) over the
image sizes listed in each annotation file, and the cache schema's byte sizes under the pipeline's
extraction options (``mfdetr.cache.schema.estimate_image_bytes``: storage dtype, projected widths,
int8 codes, BitRound; lossless codecs barely shrink float activations, so none is assumed for them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mfdetr.cache.schema import FEAT_GROUP, estimate_image_bytes
from mfdetr.detectors.base import level_dicts
from mfdetr.errors import MfdetrError
from mfdetr.pipeline.config import PipelineConfig


def _sizes(ann: Path) -> list[tuple[int, int]]:
    try:
        data = json.loads(ann.read_text())
    except json.JSONDecodeError as e:
        raise MfdetrError(f"{ann}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    try:
        return [(int(im["height"]), int(im["width"])) for im in data["images"]]
    except KeyError as e:
        raise MfdetrError(f"{ann}: an image entry lacks {e}; every image needs height and width") from e


def estimate_split(detector: Any, sizes: list[tuple[int, int]], cfg: PipelineConfig) -> dict[str, Any]:
    """Estimated stored bytes of one split's cache under the pipeline's extraction options, from the
    cache schema (``mfdetr.cache.schema.estimate_image_bytes``: dtypes, projected widths, int8 codes,
    true-size maps; BitRound / quant_bits at their entropy; an upper bound under box masking)."""
    opts = cfg.extract
    options = opts.to_attrs()
    widths = opts.project or {}
    levels = [
        {"name": lv.name, "stride": lv.stride, "channels": int(widths.get(lv.name, lv.channels))}
        for lv in detector.levels
    ]
    per_level = {lv["name"]: 0.0 for lv in levels}
    total = 0.0
    for h0, w0 in sizes:
        est = estimate_image_bytes(
            levels, tuple(detector.input_size((h0, w0))), int(detector.query_dim), options
        )
        total += est["total"]
        for lv in levels:
            per_level[lv["name"]] += est[f"{FEAT_GROUP}/{lv['name']}"]
    return {
        "images": len(sizes),
        "bytes_total": total,
        "bytes_per_image": total / max(1, len(sizes)),
        "bytes_per_level": per_level,
    }


def dry_run(cfg: PipelineConfig) -> dict[str, Any]:
    """Check paths, build the detector (local files only), print and return the cache budget."""
    from mfdetr.detectors.registry import build_detector

    splits = cfg.data.splits()
    problems = []
    for split, (images, ann) in splits.items():
        if cfg.data.kind == "synth" and not ann.is_file():
            continue  # made by the data stage
        if not ann.is_file():
            problems.append(f"{split} annotations not found: {ann}")
        if not images.is_dir():
            problems.append(f"{split} image folder not found: {images}")
    if problems:
        raise MfdetrError("dry run found problems:\n  " + "\n  ".join(problems))
    ann_val = splits["val"][1]
    categories = json.loads(ann_val.read_text()).get("categories") if ann_val.is_file() else None
    det = build_detector(
        cfg.detector.spec,
        categories=categories,
        device="cpu",
        levels=cfg.extract.levels,
        topk=cfg.extract.topk,
        label_map=cfg.detector.label_map,
    )
    report: dict[str, Any] = {
        "detector": cfg.detector.spec,
        "levels": level_dicts(det.levels),
        "query_dim": det.query_dim,
        "storage": {
            k: v
            for k, v in cfg.extract.to_attrs().items()
            if k in ("dtype", "codec", "keepbits", "quant", "quant_bits", "project", "box_mask", "box_margin")
        },
        "splits": {},
    }
    for split, (_, ann) in splits.items():
        if ann.is_file():
            report["splits"][split] = estimate_split(det, _sizes(ann), cfg)
    report["disk"] = _disk(cfg.cache_root, sum(s["bytes_total"] for s in report["splits"].values()))
    return report


def _disk(root: str, need: float) -> dict[str, Any]:
    """Free bytes of the disk holding ``root`` (its nearest existing parent) vs the estimate."""
    import shutil

    if "://" in root:
        return {"root": root, "need": need, "free": None}
    probe = Path(root).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return {"root": root, "need": need, "free": shutil.disk_usage(probe).free}


def format_budget(r: dict[str, Any]) -> str:
    """Human-readable budget table."""
    lines = [
        f"detector {r['detector']}: query dim {r['query_dim']}, levels "
        + ", ".join(f"{lv['name']} (stride {lv['stride']}, {lv['channels']} ch)" for lv in r["levels"]),
        f"storage: {r['storage']}",
        f"{'split':<8}{'images':>9}{'MB/image':>11}{'GB total':>11}  (estimated stored size, from the cache schema)",
    ]
    for split, s in r["splits"].items():
        lines.append(
            f"{split:<8}{s['images']:>9}{s['bytes_per_image'] / 1e6:>11.3f}{s['bytes_total'] / 1e9:>11.3f}"
        )
    if not r["splits"]:
        lines.append("(no annotation file yet: the data stage makes it)")
    d = r.get("disk")
    if d and d["free"] is not None and r["splits"]:
        verdict = (
            "fits" if d["need"] <= d["free"] else "does NOT fit: extract would refuse (--force to go anyway)"
        )
        lines.append(
            f"cache root {d['root']}: {d['free'] / 1e9:.1f} GB free, caches estimated at "
            f"{d['need'] / 1e9:.3f} GB: {verdict}"
        )
    return "\n".join(lines)
