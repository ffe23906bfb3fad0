"""Pixel levels: the network-input image itself as a cached level, for any detector.

A level named ``px<N>`` (``px1``, ``px2``, ``px4``) is the RGB image in the network-input frame at
stride N: the original uint8 image resized to ``input_size`` (bilinear, antialiased) and averaged
over N x N cells, 3 channels, values 0..255 (integers at stride 1 without a resize, so float16 and
bfloat16 hold them exactly). It is not a detector feature: :class:`PixelLevels` adds it to the outputs
of any :class:`~mfdetr.detectors.base.FrozenDetector`, so the cache, the loader and ``predict`` treat it
as one more level, and the mask network's pixel refinement reads image edges from it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.detectors.base import DetectorOutput, LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_json

PIXEL_LEVEL = re.compile(r"^px([1-9][0-9]*)$")


def pixel_stride(name: str) -> int:
    """The stride of a pixel level name (``px2`` -> 2), 0 for any other level."""
    m = PIXEL_LEVEL.match(str(name))
    return int(m.group(1)) if m else 0


def is_pixel_level(level: LevelSpec | str) -> bool:
    """True for a ``pxN`` level."""
    return pixel_stride(level.name if isinstance(level, LevelSpec) else level) > 0


def split_pixel_levels(levels: Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """(the detector's own level names or None for its default, the ``pxN`` names) of a level list."""
    if levels is None:
        return None, []
    own = [n for n in levels if not is_pixel_level(n)]
    pix = [n for n in levels if is_pixel_level(n)]
    if pix and not own:
        raise MfdetrError(
            f"levels {list(levels)} hold only pixel levels; list the detector's levels too "
            "(e.g. b4,e8,e16,e32,px1)"
        )
    if len(set(pix)) != len(pix):
        raise MfdetrError(f"pixel level listed twice: {pix}")
    return own, pix


def pixel_map(image: Tensor, input_size: tuple[int, int], stride: int) -> Tensor:
    """``[3, ceil(h_in/stride), ceil(w_in/stride)]`` float32 0..255 from a uint8 ``[3,H0,W0]`` image."""
    x = image.float().unsqueeze(0)
    h, w = int(input_size[0]), int(input_size[1])
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 255.0)
    if stride > 1:  # ceil_mode: a partial last cell is the mean of the pixels it covers
        x = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    return x[0]


class PixelLevels:
    """A FrozenDetector that adds ``pxN`` levels to another one's outputs (everything else delegated)."""

    def __init__(self, inner: Any, names: Sequence[str]):
        self.inner = inner
        self.pixel_levels = [LevelSpec(n, pixel_stride(n), 3) for n in names]
        self.levels = list(inner.levels) + self.pixel_levels
        self.fingerprint = sha256_json(
            {"detector": inner.fingerprint, "pixels": [lv.to_dict() for lv in self.pixel_levels], "v": 1}
        )

    def __getattr__(self, name: str) -> Any:  # spec, query_dim, label_map, id2label, topk, close, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def input_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        return self.inner.input_size(orig_size)

    def to(self, device: torch.device | str) -> PixelLevels:
        self.inner.to(device)
        return self

    def detect(self, images: list[Tensor]) -> list[DetectorOutput]:
        outs = self.inner.detect(images)
        with torch.inference_mode():
            for im, o in zip(images, outs):
                dev = o.boxes.device
                for lv in self.pixel_levels:
                    o.features[lv.name] = pixel_map(im.to(dev), o.input_size, lv.stride)
        return outs

    def __repr__(self) -> str:
        return f"PixelLevels({self.inner!r}, {[lv.name for lv in self.pixel_levels]})"
