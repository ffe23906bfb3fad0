"""Reading the internals of a Hugging Face DETR-family model for the adapter (``hf.py``): the backbone stages
(hooked for the ``b{stride}`` levels), the encoder output as ``e{stride}`` maps, level strides, the probe size."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mfdetr.detectors.hf_processing import size_get

_PROBE = 256  # probe input side used to measure level strides when the model takes any size


def backbone_module(model) -> torch.nn.Module | None:
    from transformers.backbone_utils import BackboneMixin

    for m in model.modules():
        if isinstance(m, BackboneMixin):
            return m
    return None


def stage_modules(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """Embedder + stages of an HF backbone (ResNet, RT-DETR ResNet, HGNetV2, ...), shallow to deep."""
    mods = []
    for name in ("embedder", "embeddings", "stem"):
        if isinstance(getattr(backbone, name, None), torch.nn.Module):
            mods.append(getattr(backbone, name))
            break
    enc = getattr(backbone, "encoder", None)
    stages = getattr(enc, "stages", None) if enc is not None else getattr(backbone, "stages", None)
    if isinstance(stages, torch.nn.ModuleList):
        mods.extend(stages)
    return mods


def first_tensor(x) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


def stride_of(size: int, n: int) -> int:
    s = 2 ** round(math.log2(size / n))
    if math.ceil(size / s) != n:
        raise RuntimeError(f"cannot infer the stride of a {n}-cell level from a {size}-px input")
    return s


def probe_size(config, processor) -> tuple[int, int]:
    """The probe input (h, w) that measures the level strides: the config's ``anchor_image_size``, else the
    processor's fixed size when both sides are multiples of 32, else ``_PROBE`` square."""
    anchor = getattr(config, "anchor_image_size", None)
    if anchor:
        return (int(anchor[0]), int(anchor[1])) if isinstance(anchor, (list, tuple)) else (int(anchor),) * 2
    size = getattr(processor, "size", None)
    h = size_get(size, "height")
    w = size_get(size, "width")
    if h and w and h % 32 == 0 and w % 32 == 0:
        return int(h), int(w)
    return _PROBE, _PROBE


def encoder_maps(out, shapes: list[tuple[int, int]] | None, batch: int) -> list[Tensor]:
    """The encoder's output as a list of [B,C,h,w] maps, finest first. ``shapes``: the (h, w) of each level
    of the flattened encoder memory [B, sum h*w, C] (captured by the adapter's hooks); RT-DETR-family
    encoders output maps already."""
    mem = out.encoder_last_hidden_state
    if isinstance(mem, (list, tuple)):  # RT-DETR family: already maps
        return list(mem)
    if shapes is None:
        raise RuntimeError("encoder spatial shapes were not captured")
    maps, start = [], 0
    for h, w in shapes:
        n = h * w
        maps.append(mem[:, start : start + n].transpose(1, 2).reshape(batch, -1, h, w))
        start += n
    if start != mem.shape[1]:
        raise RuntimeError(f"encoder memory has {mem.shape[1]} tokens, the shapes {shapes} give {start}")
    return maps
