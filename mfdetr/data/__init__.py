"""Data: COCO reading (``coco``), image decoding (``image_io``), the synthetic dataset (``synth``).

Names are imported lazily so that ``mfdetr.data.synth`` (used in worker processes) does not pull in
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CocoDataset": "mfdetr.data.coco",
    "Sample": "mfdetr.data.coco",
    "load_image": "mfdetr.data.image_io",
    "make_synth": "mfdetr.data.synth",
    "render_image": "mfdetr.data.synth_shapes",
    "CATEGORIES": "mfdetr.data.synth_shapes",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mfdetr.data' has no attribute {name!r}")


__all__ = list(_EXPORTS)
