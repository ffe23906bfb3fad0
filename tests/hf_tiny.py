"""Tiny random-weight models of every DETR-family ``*ForObjectDetection`` class of transformers (no download).

``make_tiny(name)`` -> (model, image processor); ``save_tiny(name, folder)`` saves both as a user saves a real
checkpoint (``save_pretrained``). Shared by the detector tests and the end-to-end ``hf:`` tests.
``tiny_config(name, width=...)`` builds the config alone, at another size (the geometry tests use it).

Each model is one row of :data:`TINY`: its class, the family of head hyper-parameters its config takes
(:func:`_head`), its backbone (:func:`_backbone`), its processor and the variant's own config values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as t

ID2LABEL = {0: "disc", 1: "Square", 2: "big triangle"}
QUERIES = 12
WIDTH = 32  # d_model / hidden_size of every tiny model (the query width)
LABELS = dict(id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
SMALL = {"shortest_edge": 64, "longest_edge": 96}  # aspect-preserving resize
RT_SIZE = {"height": 64, "width": 96}  # RT-DETR family: fixed-size resize
VIT_SIZE = {"height": 64, "width": 128}  # LW/RF-DETR: a fixed multiple of patch x windows


@dataclass(frozen=True)
class Tiny:
    model: str  # transformers model class (its config class is ``model.config_class``)
    head: str  # head hyper-parameter family: detr | dab_detr | deformable | rt_detr | vit
    backbone: str  # resnet | resnet3 | timm | timm3 | rt_resnet | hgnet | lw_vit | rf_vit
    processor: str  # transformers image processor class
    size: dict
    extra: dict = field(default_factory=dict)  # this variant's own config values


DEFORMABLE = "DeformableDetrForObjectDetection"
TINY = {
    "detr": Tiny("DetrForObjectDetection", "detr", "resnet", "DetrImageProcessor", SMALL),
    "detr_timm": Tiny("DetrForObjectDetection", "detr", "timm", "DetrImageProcessor", SMALL),
    "conditional_detr": Tiny(
        "ConditionalDetrForObjectDetection", "detr", "resnet", "ConditionalDetrImageProcessor", SMALL
    ),
    "dab_detr": Tiny(
        "DabDetrForObjectDetection", "dab_detr", "resnet", "ConditionalDetrImageProcessor", SMALL
    ),
    "table_transformer": Tiny(
        "TableTransformerForObjectDetection", "detr", "resnet", "DetrImageProcessor", SMALL
    ),
    # Deformable DETR: plain, box refine, two-stage, timm backbone
    "deformable_detr": Tiny(DEFORMABLE, "deformable", "resnet3", "DeformableDetrImageProcessor", SMALL),
    "deformable_detr_refine": Tiny(
        DEFORMABLE, "deformable", "resnet3", "DeformableDetrImageProcessor", SMALL, dict(with_box_refine=True)
    ),
    "deformable_detr_two_stage": Tiny(
        DEFORMABLE,
        "deformable",
        "resnet3",
        "DeformableDetrImageProcessor",
        SMALL,
        dict(with_box_refine=True, two_stage=True),
    ),
    "deformable_detr_timm": Tiny(DEFORMABLE, "deformable", "timm3", "DeformableDetrImageProcessor", SMALL),
    "rt_detr": Tiny("RTDetrForObjectDetection", "rt_detr", "rt_resnet", "RTDetrImageProcessor", RT_SIZE),
    "rt_detr_v2": Tiny("RTDetrV2ForObjectDetection", "rt_detr", "rt_resnet", "RTDetrImageProcessor", RT_SIZE),
    "d_fine": Tiny("DFineForObjectDetection", "rt_detr", "rt_resnet", "RTDetrImageProcessor", RT_SIZE),
    # D-FINE and DEIMv2 on D-FINE's own backbone family
    "d_fine_hgnetv2": Tiny("DFineForObjectDetection", "rt_detr", "hgnet", "RTDetrImageProcessor", RT_SIZE),
    "deimv2": Tiny("Deimv2ForObjectDetection", "rt_detr", "hgnet", "RTDetrImageProcessor", RT_SIZE),
    # LW-DETR: plain ViT, projector at strides 8 and 32 here
    "lw_detr": Tiny(
        "LwDetrForObjectDetection",
        "vit",
        "lw_vit",
        "DeformableDetrImageProcessor",
        VIT_SIZE,
        dict(projector_scale_factors=[2.0, 0.5]),
    ),
    # RF-DETR: windowed DINOv2, one projector level at the patch stride
    "rf_detr": Tiny("RfDetrForObjectDetection", "vit", "rf_vit", "RfDetrImageProcessor", VIT_SIZE),
    "rf_detr_seg": Tiny("RfDetrForInstanceSegmentation", "vit", "rf_vit", "RfDetrImageProcessor", VIT_SIZE),
}
CLASSES = {name: tiny.model for name, tiny in TINY.items()}  # name -> transformers class name
ALL = list(TINY)


def _resnet(w: int) -> dict:
    # a 4-stage basic ResNet, w/2 .. 4w channels (the last three stages give w, 2w, 4w)
    return dict(
        embedding_size=w // 2, hidden_sizes=[w // 2, w, 2 * w, 4 * w], depths=[1, 1, 1, 1], layer_type="basic"
    )


def _hgnet(w: int) -> dict:
    chans = [w // 2, w, 2 * w, 4 * w]
    q, h = w // 4, w // 2
    return dict(
        hidden_sizes=chans,
        stem_channels=[3, q, q],
        stage_in_channels=[q, *chans[:3]],
        stage_mid_channels=[q, q, h, h],
        stage_out_channels=chans,
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        out_features=["stage2", "stage3", "stage4"],
    )


def _timm(out_indices) -> dict:
    # timm's resnet18 with random weights (use_pretrained_backbone=False: nothing is downloaded)
    # (an explicit TimmBackboneConfig, as real checkpoints store it: backbone= alone would query the Hub)
    return dict(
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        backbone_config=t.TimmBackboneConfig(
            backbone="resnet18", out_indices=list(out_indices), use_pretrained_backbone=False
        ),
    )


def _backbone(kind: str, w: int) -> dict:
    """The backbone part of a config (``backbone_config`` and its switches)."""
    hf = dict(use_timm_backbone=False, use_pretrained_backbone=False)
    last3 = ["stage2", "stage3", "stage4"]
    vit = dict(
        hidden_size=w, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=16
    )
    if kind == "resnet":
        return dict(hf, backbone_config=t.ResNetConfig(**_resnet(w), out_features=["stage4"]))
    if kind == "resnet3":
        return dict(hf, backbone_config=t.ResNetConfig(**_resnet(w), out_features=last3))
    if kind == "timm":
        return _timm((1, 2, 3, 4))
    if kind == "timm3":
        return _timm((2, 3, 4))
    if kind == "rt_resnet":
        return dict(backbone_config=t.RTDetrResNetConfig(**_resnet(w), out_indices=[2, 3, 4]))
    if kind == "hgnet":
        return dict(backbone_config=t.HGNetV2Config(**_hgnet(w)))
    if kind == "lw_vit":
        return dict(
            backbone_config=t.LwDetrViTConfig(
                **vit, pretrain_image_size=64, num_windows=4, window_block_indices=[0], out_indices=[1, 2]
            )
        )
    if kind == "rf_vit":
        return dict(backbone_config=t.RfDetrDinov2Config(**vit, num_windows=2, out_indices=[1, 2]))
    raise KeyError(kind)


def _head(kind: str, w: int, decoder_layers: int, queries: int, labels: dict) -> dict:
    """The encoder/decoder part of a config: every width is ``w``, two attention heads, one encoder layer."""
    base = dict(d_model=w, decoder_layers=decoder_layers, decoder_ffn_dim=w, num_queries=queries, **labels)
    if kind == "vit":  # LW/RF-DETR: a decoder only (deformable cross-attention, group DETR)
        return dict(
            base,
            decoder_self_attention_heads=2,
            decoder_cross_attention_heads=2,
            decoder_n_points=2,
            group_detr=3,
        )
    base.update(encoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=w)
    if kind == "rt_detr":  # hybrid encoder over the backbone's last three stages (w, 2w, 4w channels)
        chans = dict(encoder_in_channels=[w, 2 * w, 4 * w], encoder_hidden_dim=w, decoder_in_channels=[w] * 3)
        return dict(base, **chans, num_denoising=0)
    if kind == "deformable":
        points = dict(encoder_n_points=2, decoder_n_points=2)
        return dict(base, **points, num_feature_levels=4, two_stage_num_proposals=queries)
    if kind == "dab_detr":  # DAB-DETR calls the query width hidden_size
        base["hidden_size"] = base.pop("d_model")
    return base


def tiny_config(
    name: str, width: int = WIDTH, decoder_layers: int = 2, queries: int = QUERIES, labels: dict = LABELS
):
    """The config of tiny model ``name`` (a key of :data:`TINY`), at query width ``width``."""
    spec = TINY[name]
    kw = {
        **_backbone(spec.backbone, width),
        **_head(spec.head, width, decoder_layers, queries, labels),
        **spec.extra,
    }
    return getattr(t, spec.model).config_class(**kw)


def make_tiny(name: str):
    """(model, image processor) of a tiny random model: ``name`` is a key of :data:`TINY`."""
    spec = TINY[name]
    return getattr(t, spec.model)(tiny_config(name)), getattr(t, spec.processor)(size=spec.size)


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model, proc = make_tiny(name)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return Path(folder)
