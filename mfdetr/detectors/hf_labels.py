"""Model label ids -> dataset category ids for the HF adapter (``hf.py``): a label map file or dict, or
the model's ``id2label`` names matched to the category names."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError


def normalize_label_name(name: str) -> str:
    """Case-, space-, '_' and '-'-insensitive form of a class name."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def resolve_label_map(
    id2label: dict[int, str],
    categories: Sequence[dict[str, Any]] | None,
    label_map: str | Path | dict | None,
    where: str,
) -> dict[int, int] | None:
    """Model label id -> dataset category id. ``None`` = identity (labels are the model's own ids).

    label_map: a JSON file or dict ``{model_label_id (or model label name): dataset_category_id}``;
    otherwise, with ``categories``, the model's ``id2label`` names are matched to the category names.
    """
    cat_ids = None if categories is None else {int(c["id"]) for c in categories}
    if label_map is not None:
        if isinstance(label_map, (str, Path)):
            p = Path(label_map)
            if not p.is_file():
                raise MfdetrError(f"label map file not found: {p}")
            try:
                raw = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise MfdetrError(f"label map {p}: not valid JSON ({e})") from None
        else:
            raw = dict(label_map)
        by_name = {normalize_label_name(v): k for k, v in id2label.items()}
        out: dict[int, int] = {}
        for k, v in raw.items():
            if isinstance(k, str) and not re.fullmatch(r"-?\d+", k.strip()):
                key = by_name.get(normalize_label_name(k))
                if key is None:
                    raise MfdetrError(
                        f"label map: {k!r} is not a label of {where} (labels: {sorted(id2label.values())})"
                    )
            else:
                key = int(k)
                if key not in id2label:
                    raise MfdetrError(
                        f"label map: model label id {key} does not exist in {where} "
                        f"(ids 0..{len(id2label) - 1})"
                    )
            try:
                val = int(v)
            except (TypeError, ValueError):
                raise MfdetrError(
                    f"label map: value for {k!r} must be a dataset category id, got {v!r}"
                ) from None
            if cat_ids is not None and val not in cat_ids:
                raise MfdetrError(
                    f"label map: category id {val} (for model label {k!r}) is not in the dataset "
                    f"categories {sorted(cat_ids)}"
                )
            out[key] = val
        if not out:
            raise MfdetrError("label map is empty: no model label maps to a dataset category")
        return out
    if categories is None:
        return None
    names = {}
    for c in categories:
        names.setdefault(normalize_label_name(c["name"]), int(c["id"]))
    out = {}
    for k, v in id2label.items():
        cid = names.get(normalize_label_name(v))
        if cid is not None:
            out[int(k)] = cid
    if not out:
        raise MfdetrError(
            f"no class of {where} maps onto the dataset's categories by name: model labels "
            f"{sorted(set(id2label.values()))[:20]}, dataset categories {[c['name'] for c in categories][:20]}; "
            "pass a label map JSON {model_label_id: dataset_category_id}"
        )
    return out
