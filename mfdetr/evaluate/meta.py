"""What a mask-network checkpoint records about its detector, levels and categories, and the check
that a cache was extracted with the same detector and levels (used by ``evaluate`` and ``predict``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfdetr.cache.storage import check_same_projection, projection_id
from mfdetr.detectors.base import level_dicts
from mfdetr.errors import MfdetrError


def meta_detector(meta: dict[str, Any]) -> dict[str, Any]:
    """The detector a checkpoint was trained on: ``{spec, fingerprint, levels, detector_levels, topk}``
    (``meta`` as ``mfdetr.model.checkpoint.read_checkpoint`` returns it: older formats are upgraded there)."""
    det = meta["detector"]
    return {
        "spec": det.get("spec"),
        "fingerprint": det.get("fingerprint"),
        # the levels the mask network reads / the levels the detector was built with
        "levels": level_dicts(meta["levels"]),
        "detector_levels": level_dicts(det["levels"]),
        "topk": det.get("topk"),
    }


def meta_categories(meta: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The dataset categories a checkpoint recorded (``[{id, name}]``), if any."""
    cats = (meta.get("dataset") or {}).get("categories")
    if not cats:
        return None
    return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]


def check_compatible(meta: dict[str, Any], cache_attrs: dict[str, Any], cache: str, checkpoint: Path) -> None:
    """Refuse a checkpoint trained on another detector (fingerprint) or on levels the cache lacks."""
    want = meta_detector(meta)
    have = cache_attrs.get("detector") or {}
    fp_c, fp_k = have.get("fingerprint"), want["fingerprint"]
    if fp_c and fp_k and fp_c != fp_k:
        raise MfdetrError(
            f"checkpoint {checkpoint} was trained on detector {want['spec']!r} (fingerprint {fp_k[:12]}) but "
            f"cache {cache} holds detector {have.get('spec')!r} (fingerprint {fp_c[:12]}): extract the "
            "validation cache with the checkpoint's detector and options"
        )
    cache_levels = {d["name"]: d for d in level_dicts(have.get("levels"))}
    for lv in want["levels"]:
        got = cache_levels.get(lv["name"])
        if cache_levels and (
            got is None or got["stride"] != lv["stride"] or got["channels"] != lv["channels"]
        ):
            raise MfdetrError(
                f"checkpoint {checkpoint} needs feature level {lv} that cache {cache} does not hold as such "
                f"(cache levels: {list(cache_levels.values())}): extract the cache with the same levels"
            )
    if "projection" in meta:  # format 3 on: the bases the network was trained in
        want_id = projection_id({"project": meta["projection"]})
        check_same_projection(
            want_id, cache_attrs.get("storage"), f"cache {cache}", f"checkpoint {checkpoint}"
        )
