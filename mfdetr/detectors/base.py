"""The FrozenDetector protocol and its per-image output (the contract of ../docs/DESIGN.md).

Coordinate frames:
- *original*: pixels of the image file as read (``[3, H0, W0]``).
- *network input*: the resized, unpadded image the network saw, ``input_size = (h_in, w_in)``.
  A point maps original -> input as ``x_in = x0 * scale[0]``, ``y_in = y0 * scale[1]``
  (``scale = (sx, sy)``: RT-DETR resizes to a fixed square, so sx != sy in general).
- *level*: a feature map of stride ``s`` covers the input frame; input pixel ``x_in`` sits at
  ``x_in / s`` on it (RoIAlign ``spatial_scale = 1 / s``, ``aligned=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class LevelSpec:
    """One named feature level a detector exposes.

    name: short identifier, also the Zarr array name suffix (e.g. ``"b4"`` backbone stride 4,
        ``"e8"`` encoder memory stride 8).
    stride: input pixels per feature cell.
    channels: C of the ``[C, h, w]`` map.
    """

    name: str
    stride: int
    channels: int

    def to_dict(self) -> dict[str, Any]:
        """``{name, stride, channels}``: the form stored in cache attributes and checkpoints."""
        return {"name": str(self.name), "stride": int(self.stride), "channels": int(self.channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> LevelSpec:
        """From ``{name, stride, channels}`` (or any object with those attributes, e.g. a LevelSpec)."""
        get = d.__getitem__ if isinstance(d, Mapping) else (lambda k: getattr(d, k))
        return cls(str(get("name")), int(get("stride")), int(get("channels")))


def level_dicts(levels: Iterable[LevelSpec | Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """LevelSpecs or level dicts -> ``[{name, stride, channels}]`` (the stored form; ints coerced)."""
    return [LevelSpec.from_dict(lv).to_dict() for lv in levels or []]


@dataclass
class DetectorOutput:
    """What a frozen detector returns for ONE image.

    boxes:    [K, 4] float32, xyxy in ORIGINAL image pixels (clipped to the image).
    scores:   [K] float32, descending.
    labels:   [K] int64, the DATASET's own category ids.
    queries:  [K, D] float32, last decoder layer embedding of the query each box came from.
    features: name -> [C, h, w] float32 map in the network-input frame, cropped to the valid
              (unpadded) region: h = ceil(h_in / stride), w = ceil(w_in / stride).
    scale:    (sx, sy) network-input pixels per original pixel.
    input_size: (h_in, w_in) of the resized, unpadded network input.
    orig_size:  (H0, W0) of the original image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    queries: Tensor
    features: dict[str, Tensor]
    scale: tuple[float, float]
    input_size: tuple[int, int]
    orig_size: tuple[int, int]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> DetectorOutput:
        """A copy with every tensor on ``device``."""
        return DetectorOutput(
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            queries=self.queries.to(device),
            features={k: v.to(device) for k, v in self.features.items()},
            scale=self.scale,
            input_size=self.input_size,
            orig_size=self.orig_size,
            extras={k: v.to(device) for k, v in self.extras.items()},
        )


@runtime_checkable
class FrozenDetector(Protocol):
    """A frozen DETR-family detector (eval mode, no gradients, any device).

    Attributes:
        spec: the spec string it was built from (``hf:PATH``, ``shapes``, ``py:mod:fn``).
        levels: the feature levels ``detect`` returns, in order.
        query_dim: D of the returned queries.
        fingerprint: hex hash of weights + config + preprocessing + detector options
            (levels, top-k, label mapping): equal fingerprints give equal outputs.
        device: where it runs.
    """

    spec: str
    levels: list[LevelSpec]
    query_dim: int
    fingerprint: str
    device: torch.device

    def detect(self, images: list[Tensor]) -> list[DetectorOutput]:
        """Run on a batch of RGB uint8 images ``[3, H_i, W_i]`` (any sizes, any device).

        Returns one DetectorOutput per image, in order; runs under ``torch.inference_mode()``.
        """
        ...

    def input_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        """(h_in, w_in) the network input will have for an original image of (H0, W0).

        Lets extraction size the padded per-level cache arrays before running anything.
        """
        ...

    def to(self, device: torch.device | str) -> FrozenDetector:
        """Move to ``device`` and return self."""
        ...
