"""Custom operators: fused multi-level RoIAlign (``multilevel_roi_align``)."""

from mfdetr.ops.roi_align import multilevel_roi_align, release_workspace

__all__ = ["multilevel_roi_align", "release_workspace"]
