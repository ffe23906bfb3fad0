"""The mask network (image / box / query encoders, mask-IoU head, FCN baseline), losses, checkpoints.

Public API: ``MaskNetConfig``, ``LossConfig``, ``build_mask_net``, ``MaskNet``, ``FCNMaskNet``,
``load_mask_net``. Submodules are imported lazily so ``mfdetr.model.matching`` stays light.
"""

from __future__ import annotations

from typing import Any

from mfdetr.model.config import LossConfig, MaskNetConfig

__all__ = ["LossConfig", "MaskNetConfig", "build_mask_net", "MaskNet", "FCNMaskNet", "load_mask_net"]


def __getattr__(name: str) -> Any:
    if name in ("build_mask_net", "MaskNet"):
        from mfdetr.model import mask_net

        return getattr(mask_net, name)
    if name == "FCNMaskNet":
        from mfdetr.model.fcn_head import FCNMaskNet

        return FCNMaskNet
    if name == "load_mask_net":
        from mfdetr.model.checkpoint import load_mask_net

        return load_mask_net
    raise AttributeError(f"module 'mfdetr.model' has no attribute {name!r}")
