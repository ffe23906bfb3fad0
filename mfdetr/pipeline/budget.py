"""Dry run of a pipeline: check every path and estimate the cache budget before extracting anything.

The estimate uses the detector's own levels and resize rule (``FrozenDetector.input_size``) over the
image sizes listed in each annotation file: bytes of the true-size feature maps, queries, boxes and
bit-packed mask targets in the storage dtype, before compression (lossless codecs barely shrink float
activations; BitRound with keepbits k shrinks them to roughly (1 + 5 + k) / 16 of float16 under zstd).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mfdetr.pipeline.config import PipelineConfig
from mfdetr.errors import MfdetrError

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


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
    """Estimated uncompressed bytes of one split's cache (true-size maps; padding compresses away)."""
    opts = cfg.extract
    eb = _DTYPE_BYTES[opts.dtype]
    per_level = {lv.name: 0 for lv in detector.levels}
    for h0, w0 in sizes:
        h, w = detector.input_size((h0, w0))
        for lv in detector.levels:
            per_level[lv.name] += lv.channels * math.ceil(h / lv.stride) * math.ceil(w / lv.stride) * eb
    k = opts.topk
    per_image_fixed = k * (detector.query_dim * eb + 4 * 4 + 4 + 8 + 8 + 4) + k * opts.mask_size * opts.mask_size // 8
    total = sum(per_level.values()) + per_image_fixed * len(sizes)
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
        cfg.detector.spec, categories=categories, device="cpu", levels=cfg.extract.levels,
        topk=cfg.extract.topk, label_map=cfg.detector.label_map,
    )
    report: dict[str, Any] = {
        "detector": cfg.detector.spec,
        "levels": [{"name": lv.name, "stride": lv.stride, "channels": lv.channels} for lv in det.levels],
        "query_dim": det.query_dim,
        "storage": {"dtype": cfg.extract.dtype, "codec": cfg.extract.codec, "keepbits": cfg.extract.keepbits},
        "splits": {},
    }
    for split, (_, ann) in splits.items():
        if ann.is_file():
            report["splits"][split] = estimate_split(det, _sizes(ann), cfg)
    return report


def format_budget(r: dict[str, Any]) -> str:
    """Human-readable budget table."""
    lines = [
        f"detector {r['detector']}: query dim {r['query_dim']}, levels "
        + ", ".join(f"{lv['name']} (stride {lv['stride']}, {lv['channels']} ch)" for lv in r["levels"]),
        f"storage: {r['storage']}",
        f"{'split':<8}{'images':>9}{'MB/image':>11}{'GB total':>11}  (uncompressed, before codec)",
    ]
    for split, s in r["splits"].items():
        lines.append(f"{split:<8}{s['images']:>9}{s['bytes_per_image'] / 1e6:>11.3f}{s['bytes_total'] / 1e9:>11.3f}")
    if not r["splits"]:
        lines.append("(no annotation file yet: the data stage makes it)")
    return "\n".join(lines)
