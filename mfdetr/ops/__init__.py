"""Custom operators: fused multi-level RoIAlign (``multilevel_roi_align``)."""

from mfdetr.ops.roi_align import (
    flatten_levels,
    multilevel_roi_align,
    multilevel_roi_align_flat,
    multilevel_roi_align_reference,
    release_workspace,
)

__all__ = [
    "flatten_levels",
    "multilevel_roi_align",
    "multilevel_roi_align_flat",
    "multilevel_roi_align_reference",
    "release_workspace",
]
