"""Pre- and post-processing of the HF adapter (``hf.py``): an image's network-input size by the processor's
resize rule, the valid extent of each image of a processor batch, and the top-k (query, class) selection of
``post_process_object_detection``."""

from __future__ import annotations

import torch
from torch import Tensor


def size_get(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def valid_size(enc) -> list[tuple[int, int]]:
    """(h_in, w_in) of each image of a processor batch: the pixel_mask's valid extent, else the tensor size."""
    pv = enc["pixel_values"]
    mask = enc.get("pixel_mask")
    if mask is None:
        return [tuple(int(v) for v in pv.shape[-2:])] * pv.shape[0]
    out = []
    for m in mask:
        rows = int(m.any(1).sum())
        cols = int(m.any(0).sum())
        out.append((rows, cols))
    return out


def analytic_input_size(processor, orig: tuple[int, int]) -> tuple[int, int] | None:
    """The network-input (h, w) of an ``orig`` (h, w) image by the processor's resize rule; None when the
    processor's ``size`` has no rule this knows (then the size is measured)."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    p = processor
    if not getattr(p, "do_resize", True):
        return tuple(orig)
    size = getattr(p, "size", None)
    se, le = size_get(size, "shortest_edge"), size_get(size, "longest_edge")
    mh, mw = size_get(size, "max_height"), size_get(size, "max_width")
    h, w = size_get(size, "height"), size_get(size, "width")
    if se and le:
        return tuple(int(v) for v in get_size_with_aspect_ratio(tuple(orig), se, le))
    if mh and mw:
        return tuple(int(v) for v in get_image_size_for_max_height_width(tuple(orig), mh, mw))
    if h and w:
        return int(h), int(w)
    return None


def select_topk(
    logits: Tensor, keep_class: Tensor, score_kind: str, topk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [B,K], labels [B,K] model ids, query index [B,K]) from ``logits`` [B,Q,classes], as
    ``post_process_object_detection`` ranks them, with unmapped classes (``keep_class`` [classes] False)
    excluded (score -1.0). score_kind:

    - ``"softmax"``: softmax over the logits without the last column, best class per query, then a top-k over
      queries (DETR / Table Transformer, whose last column is no-object; RT-DETR-family processors do the same
      with ``use_focal_loss=False``);
    - ``"sigmoid"``: a sigmoid per (query, class) and a top-k over query x class (every focal-loss model).
    """
    keep = keep_class.to(logits.device)
    if score_kind == "softmax":
        prob = logits.softmax(-1)[..., :-1]
        prob = prob.masked_fill(~keep[: prob.shape[-1]], -1.0)
        scores, labels = prob.max(-1)
        k = min(topk, scores.shape[1])
        scores, qidx = scores.topk(k, dim=1)
        labels = labels.gather(1, qidx)
    elif score_kind == "sigmoid":
        prob = logits.sigmoid()
        c = prob.shape[-1]
        prob = prob.masked_fill(~keep[:c], -1.0)
        k = min(topk, prob.shape[1] * c)
        scores, idx = prob.flatten(1).topk(k, dim=1)
        labels = idx % c
        qidx = torch.div(idx, c, rounding_mode="floor")
    else:
        raise ValueError(f"unknown score kind {score_kind!r}")
    return scores, labels, qidx
