"""Reading the internals of a Hugging Face DETR-family model for the adapter (``hf.py``), by what the model
exposes rather than by its class:

- ``b{stride}`` levels: the backbone's stages (HF ResNet / RT-DETR ResNet / HGNetV2 stages, the children of a
  timm ``features_only`` net, a ViT's patch embedding) and the backbone's own output feature maps (a ViT /
  DINOv2 backbone's chosen layers), read by forward hooks; the deepest module of each stride names the level.
- ``e{stride}`` levels: the multi-scale memory, from the outputs when ``encoder_last_hidden_state`` is a list
  of maps (RT-DETR, RT-DETRv2, D-FINE, DEIMv2: the hybrid encoder's output), otherwise the memory the decoder
  cross-attends to (``encoder_hidden_states`` of the decoder's forward, read by a pre-hook): the transformer
  encoder's output (DETR, Conditional / DAB / Deformable DETR, Table Transformer) or, for encoder-less models
  (LW-DETR, RF-DETR), the projector's maps over the ViT backbone. Its levels' shapes come from the decoder's
  ``spatial_shapes_list`` / ``spatial_shapes``; a single-level memory without them has the shape of the
  deepest backbone output map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mfdetr.detectors.hf_processing import size_get
from mfdetr.errors import MfdetrError

_PROBE = 256  # probe input side used to measure level strides when the model takes any size


def backbone_module(model) -> torch.nn.Module | None:
    """The backbone: the first HF ``BackboneMixin`` module, else the first timm ``features_only`` net (timm
    backbones of DETR / Deformable DETR are unwrapped to the bare timm model, which has ``feature_info``)."""
    from transformers.backbone_utils import BackboneMixin

    timm_like = None
    for m in model.modules():
        if isinstance(m, BackboneMixin):
            return m
        if timm_like is None and hasattr(m, "feature_info") and isinstance(m, torch.nn.Module):
            timm_like = m
    return timm_like


def stage_modules(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's sequential stages, shallow to deep: embedder + stages of an HF backbone, or the children
    of a timm ``features_only`` net (a ModuleDict run in order)."""
    mods = []
    for name in ("embedder", "embeddings", "stem"):
        if isinstance(getattr(backbone, name, None), torch.nn.Module):
            mods.append(getattr(backbone, name))
            break
    enc = getattr(backbone, "encoder", None)
    stages = getattr(enc, "stages", None) if enc is not None else getattr(backbone, "stages", None)
    if isinstance(stages, torch.nn.ModuleList):
        mods.extend(stages)
    elif not mods and hasattr(backbone, "feature_info") and isinstance(backbone, torch.nn.ModuleDict):
        mods.extend(backbone.children())
    return mods


def backbone_output_maps(output) -> list[Tensor]:
    """The 4-D feature maps a backbone's forward returned (``BackboneOutput.feature_maps`` or a list)."""
    maps = getattr(output, "feature_maps", None)
    if maps is None and isinstance(output, (list, tuple)):
        maps = output
    return [t for t in (maps or []) if isinstance(t, Tensor) and t.dim() == 4]


def decoder_module(model) -> torch.nn.Module | None:
    """The outermost submodule named ``decoder`` (the DETR decoder of every family)."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == "decoder"]
    return model.get_submodule(min(names, key=len)) if names else None


def first_tensor(x) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


def stride_of(size: int, n: int) -> int:
    """The stride of a level with ``n`` cells along a ``size``-px input side: conv stages give
    ``ceil(size / s)`` cells, patch embeddings ``floor(size / s)`` (a ViT patch may be 14: any integer)."""
    s = max(1, round(size / n))
    p2 = 2 ** round(math.log2(size / n))
    for cand in (p2, s):
        if math.ceil(size / cand) == n or size // cand == n:
            return int(cand)
    raise RuntimeError(f"cannot infer the stride of a {n}-cell level from a {size}-px input")


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


def decoder_memory_shapes(kwargs) -> list[tuple[int, int]] | None:
    shapes = kwargs.get("spatial_shapes_list")
    if shapes is None and kwargs.get("spatial_shapes") is not None:
        shapes = kwargs["spatial_shapes"].tolist()
    return None if shapes is None else [(int(s[0]), int(s[1])) for s in shapes]


def memory_maps(out, captured: dict, batch: int) -> list[Tensor]:
    """The multi-scale memory as a list of [B,C,h,w] maps, finest first (see the module docstring); ``[]``
    when the model exposes none. ``captured``: what the adapter's hooks read in this forward."""
    mem = getattr(out, "encoder_last_hidden_state", None)
    if isinstance(mem, (list, tuple)) and mem and all(isinstance(t, Tensor) and t.dim() == 4 for t in mem):
        return list(mem)
    mem = captured.get("memory")
    if mem is None or mem.dim() != 3:
        return []
    shapes = captured.get("memory_shapes")
    if shapes is None:
        last = captured.get("backbone_out")
        if not last:
            raise RuntimeError("the decoder's memory has no spatial shapes and the backbone returned no maps")
        shapes = [tuple(int(v) for v in last[-1].shape[-2:])]
    maps, start = [], 0
    for h, w in shapes:
        n = h * w
        maps.append(mem[:, start : start + n].transpose(1, 2).reshape(batch, -1, h, w))
        start += n
    if start != mem.shape[1]:
        raise RuntimeError(f"the decoder's memory has {mem.shape[1]} tokens, shapes {shapes} give {start}")
    return maps


def check_outputs(out, model, num_classes: int, spec: str) -> tuple[str, int]:
    """What the mask network needs from a probe forward's outputs -> (score kind, query width); a clear error
    naming what is missing. The score kind follows the logits' width: a no-object column -> ``"softmax"``."""
    name = type(model).__name__
    missing = [k for k in ("logits", "pred_boxes", "last_hidden_state") if getattr(out, k, None) is None]
    if missing:
        raise MfdetrError(
            f"{spec}: {name} outputs have no {', '.join(missing)}: the hf: adapter needs class "
            "logits, pred_boxes and the decoder's last hidden state per query"
        )
    q, lq = out.logits.shape[1], out.last_hidden_state.shape[1]
    if lq != q or out.pred_boxes.shape[1] != q:
        raise MfdetrError(
            f"{spec}: {name}'s last_hidden_state has {lq} rows per image for {q} queries "
            "(logits): it is not the decoder's embedding of each query"
        )
    c = out.logits.shape[-1]
    if c == num_classes + 1:
        kind = "softmax"  # a no-object column: DETR's softmax post-processing
    elif getattr(model.config, "use_focal_loss", True) is False:
        kind = "softmax"  # what RTDetrImageProcessor does with use_focal_loss=False
    elif c == num_classes:
        kind = "sigmoid"
    else:
        raise MfdetrError(f"{spec}: {name} gives {c} logits per query for {num_classes} labels")
    return kind, int(out.last_hidden_state.shape[-1])
