"""Helpers the benchmark scripts share: options, random-weight detector configs (no download), size tables
and the step's forced matches. Import it with the benchmarks folder on ``sys.path`` (a script there has it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def add_workdir_detector_options(ap: argparse.ArgumentParser) -> None:
    """``--workdir`` (keep data and caches there) and ``--detector`` (the spec of the 192 px rows)."""
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--detector",
        default=None,
        help="detector spec for the 192 px rows (default: shapes, or its "
        "random-weight architecture while the shipped weights are missing)",
    )


def column(table: dict[str, tuple], i: int) -> dict[str, Any]:
    """Column ``i`` of a ``{field: (value per profile)}`` size table, as keyword arguments."""
    return {k: v[i] for k, v in table.items()}


def labels(id2label: dict[int, str]) -> dict[str, Any]:
    """The category keyword arguments of a transformers detector config."""
    return dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})


def _shapes_model():
    """``tools/shapes_detector/model.py``: the shipped ``shapes`` architecture."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    from shapes_detector import model

    return model


def shapes_config(size: int = 192, queries: int = 100):
    """The shipped ``shapes`` architecture (``tools/train_shapes_detector.py``) at ``size`` px."""
    m = _shapes_model()
    return m.build_config(len(m.CATEGORY_NAMES), dict(enumerate(m.CATEGORY_NAMES)), size, queries=queries)


def shapes_processor(size: int = 192):
    """The shipped ``shapes`` detector's image processor at ``size`` px."""
    return _shapes_model().build_processor(size)


def r50_config(id2label: dict[int, str]):
    """RT-DETR with transformers' ResNet-50 backbone (``RTDetrConfig`` defaults), no denoising queries."""
    import transformers as t

    return t.RTDetrConfig(
        **labels(id2label), use_pretrained_backbone=False, use_timm_backbone=False, num_denoising=0
    )


def two_stage_deformable_config(backbone_config, id2label: dict[int, str], **sizes):
    """A DINO-style Deformable DETR (two-stage, box refinement, 4 levels) on an HF ``backbone_config``."""
    import transformers as t

    return t.DeformableDetrConfig(
        backbone_config=backbone_config,
        backbone=None,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        two_stage=True,
        with_box_refine=True,
        num_feature_levels=4,
        **labels(id2label),
        **sizes,
    )


def force_matched(batch: dict[str, Any], n: int = 8) -> dict[str, Any]:
    """Every image gets >= n matched boxes (random targets) when the detector matched fewer: a
    random-weight detector matches almost nothing, and the step should cost what it costs with a real one."""
    valid = batch["valid"]
    matched = valid & (batch["match_ann_id"] >= 0)
    if int(matched.sum(1).min()) >= min(n, int(valid.sum(1).min())):
        return batch
    b = dict(batch)
    ids = batch["match_ann_id"].clone()
    first = valid & (valid.cumsum(1) <= n)
    ids[first] = torch.arange(int(first.sum()), device=ids.device)
    b["match_ann_id"] = ids
    g = torch.Generator().manual_seed(0)
    b["mask_targets"] = (torch.rand(batch["mask_targets"].shape, generator=g) > 0.5).to(ids.device)
    return b
