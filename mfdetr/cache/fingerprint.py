"""Cache fingerprints and the store names derived from them.

A cache is identified by ``sha256(schema version, detector fingerprint, dataset fingerprint,
extraction options)``: equal fingerprints mean equal bytes, so a second extract with the same
inputs reuses the store and a store holding another fingerprint is never written into.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mfdetr.cache.schema import SCHEMA_VERSION
from mfdetr.utils.hashing import sha256_json


def cache_fingerprint(detector_fp: str, dataset_fp: str, options: dict[str, Any]) -> str:
    """Hex sha256 naming a cache: detector x dataset x extraction options (x schema version)."""
    return sha256_json(
        {"schema_version": SCHEMA_VERSION, "detector": detector_fp, "dataset": dataset_fp, "options": options}
    )


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return s[:40] or "x"


def detector_short_name(spec: str) -> str:
    """A short readable name for a detector spec: ``shapes``, ``hf:/a/rtdetr_r50`` -> ``rtdetr_r50``,
    ``py:pkg.mod:make`` -> ``make``."""
    if spec.startswith("hf:"):
        return _slug(Path(spec[3:].rstrip("/\\")).name or "hf")
    if spec.startswith("py:"):
        return _slug(spec.rsplit(":", 1)[-1])
    return _slug(spec)


def dataset_short_name(annotations: str | Path) -> str:
    """``.../train/annotations.json`` -> ``train``; ``.../instances_val2017.json`` -> ``instances_val2017``."""
    p = Path(annotations)
    stem = p.stem
    if stem.lower() in ("annotations", "instances", "annotation", "labels") and p.parent.name:
        return _slug(p.parent.name)
    return _slug(stem)


def store_name(detector_spec: str, annotations: str | Path, fingerprint: str) -> str:
    """Store directory name under a cache root: ``<detector>-<dataset>-<fp[:12]>.zarr``."""
    return f"{detector_short_name(detector_spec)}-{dataset_short_name(annotations)}-{fingerprint[:12]}.zarr"
