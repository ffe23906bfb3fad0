"""Tiny random-weight models of every DETR-family ``*ForObjectDetection`` class of transformers (no download).

``make_tiny(name)`` -> (model, image processor); ``save_tiny(name, folder)`` saves both as a user saves a real
checkpoint (``save_pretrained``). Shared by the detector tests and the end-to-end ``hf:`` tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as t

ID2LABEL = {0: "disc", 1: "Square", 2: "big triangle"}
QUERIES = 12
WIDTH = 32  # d_model / hidden_size of every tiny model (the query width)

# name -> transformers class name (several names share a class: config variants)
CLASSES = {
    "detr": "DetrForObjectDetection",
    "detr_timm": "DetrForObjectDetection",
    "conditional_detr": "ConditionalDetrForObjectDetection",
    "dab_detr": "DabDetrForObjectDetection",
    "table_transformer": "TableTransformerForObjectDetection",
    "deformable_detr": "DeformableDetrForObjectDetection",
    "deformable_detr_refine": "DeformableDetrForObjectDetection",
    "deformable_detr_two_stage": "DeformableDetrForObjectDetection",
    "deformable_detr_timm": "DeformableDetrForObjectDetection",
    "rt_detr": "RTDetrForObjectDetection",
    "rt_detr_v2": "RTDetrV2ForObjectDetection",
    "d_fine": "DFineForObjectDetection",
    "d_fine_hgnetv2": "DFineForObjectDetection",
    "deimv2": "Deimv2ForObjectDetection",
    "lw_detr": "LwDetrForObjectDetection",
    "rf_detr": "RfDetrForObjectDetection",
    "rf_detr_seg": "RfDetrForInstanceSegmentation",
}
ALL = list(CLASSES)
LABELS = dict(id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
SMALL = {"shortest_edge": 64, "longest_edge": 96}


def _resnet(out_features):
    return t.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def _timm(out_indices=(1, 2, 3, 4)):
    # timm's resnet18 with random weights (use_pretrained_backbone=False: nothing is downloaded)
    # (an explicit TimmBackboneConfig, as real checkpoints store it: backbone= alone would query the Hub)
    return dict(
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        backbone_config=t.TimmBackboneConfig(
            backbone="resnet18", out_indices=list(out_indices), use_pretrained_backbone=False
        ),
    )


def _detr_like(name):
    common = dict(
        d_model=WIDTH,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=QUERIES,
        **LABELS,
    )
    hf_bb = dict(use_timm_backbone=False, use_pretrained_backbone=False)
    if name == "detr":
        cfg = t.DetrConfig(backbone_config=_resnet(["stage4"]), **hf_bb, **common)
        return t.DetrForObjectDetection(cfg), t.DetrImageProcessor(size=SMALL)
    if name == "detr_timm":
        return t.DetrForObjectDetection(t.DetrConfig(**_timm(), **common)), t.DetrImageProcessor(size=SMALL)
    if name == "conditional_detr":
        return t.ConditionalDetrForObjectDetection(
            t.ConditionalDetrConfig(backbone_config=_resnet(["stage4"]), **hf_bb, **common)
        ), t.ConditionalDetrImageProcessor(size=SMALL)
    if name == "table_transformer":
        return t.TableTransformerForObjectDetection(
            t.TableTransformerConfig(backbone_config=_resnet(["stage4"]), **hf_bb, **common)
        ), t.DetrImageProcessor(size=SMALL)
    if name == "dab_detr":
        kw = {k: v for k, v in common.items() if k != "d_model"}
        return t.DabDetrForObjectDetection(
            t.DabDetrConfig(backbone_config=_resnet(["stage4"]), **hf_bb, hidden_size=WIDTH, **kw)
        ), t.ConditionalDetrImageProcessor(size=SMALL)
    # Deformable DETR: plain, box refine, two-stage, timm backbone
    bb = (
        _timm((2, 3, 4))
        if name == "deformable_detr_timm"
        else dict(backbone_config=_resnet(["stage2", "stage3", "stage4"]), **hf_bb)
    )
    cfg = t.DeformableDetrConfig(
        **bb,
        **common,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        two_stage_num_proposals=QUERIES,
        with_box_refine=name.endswith(("refine", "stage")),
        two_stage=name == "deformable_detr_two_stage",
    )
    return t.DeformableDetrForObjectDetection(cfg), t.DeformableDetrImageProcessor(size=SMALL)


def _rt_detr_like(name):
    backbone = t.RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_indices=[2, 3, 4],
    )
    hgnet = dict(
        hidden_sizes=[16, 32, 64, 128],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32, 64],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 64, 128],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        out_features=["stage2", "stage3", "stage4"],
    )
    kw = dict(
        backbone_config=backbone,
        encoder_in_channels=[32, 64, 128],
        encoder_hidden_dim=32,
        d_model=WIDTH,
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=QUERIES,
        num_denoising=0,
        **LABELS,
    )
    proc = t.RTDetrImageProcessor(size={"height": 64, "width": 96})
    if name == "rt_detr":
        return t.RTDetrForObjectDetection(t.RTDetrConfig(**kw)), proc
    if name == "rt_detr_v2":
        return t.RTDetrV2ForObjectDetection(t.RTDetrV2Config(**kw)), proc
    if name == "d_fine":
        return t.DFineForObjectDetection(t.DFineConfig(**kw)), proc
    if name == "d_fine_hgnetv2":  # D-FINE's own backbone family
        kw["backbone_config"] = t.HGNetV2Config(**hgnet)
        return t.DFineForObjectDetection(t.DFineConfig(**kw)), proc
    if name == "deimv2":
        kw["backbone_config"] = t.HGNetV2Config(**hgnet)
        return t.Deimv2ForObjectDetection(t.Deimv2Config(**kw, encoder_layers=1)), proc
    raise KeyError(name)


def _vit_like(name):
    """LW-DETR (plain ViT, projector at strides 8 and 32 here) and RF-DETR (windowed DINOv2, one projector
    level at the patch stride); inputs are a fixed multiple of patch x windows."""
    dec = dict(
        d_model=WIDTH,
        decoder_layers=2,
        decoder_self_attention_heads=2,
        decoder_cross_attention_heads=2,
        decoder_ffn_dim=32,
        decoder_n_points=2,
        num_queries=QUERIES,
        group_detr=3,
        **LABELS,
    )
    if name == "lw_detr":
        vit = t.LwDetrViTConfig(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=64,
            pretrain_image_size=64,
            patch_size=16,
            num_windows=4,
            window_block_indices=[0],
            out_indices=[1, 2],
        )
        cfg = t.LwDetrConfig(backbone_config=vit, projector_scale_factors=[2.0, 0.5], **dec)
        proc = t.DeformableDetrImageProcessor(size={"height": 64, "width": 128})
        return t.LwDetrForObjectDetection(cfg), proc
    vit = t.RfDetrDinov2Config(
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=64,
        patch_size=16,
        num_windows=2,
        out_indices=[1, 2],
    )
    cfg = t.RfDetrConfig(backbone_config=vit, **dec)
    cls = t.RfDetrForInstanceSegmentation if name == "rf_detr_seg" else t.RfDetrForObjectDetection
    return cls(cfg), t.RfDetrImageProcessor(size={"height": 64, "width": 128})


def make_tiny(name: str):
    """(model, image processor) of a tiny random model: ``name`` is a key of :data:`CLASSES`."""
    if name not in CLASSES:
        raise KeyError(name)
    if name.startswith(("rt_detr", "d_fine", "deimv2")):
        return _rt_detr_like(name)
    if name.startswith(("lw_detr", "rf_detr")):
        return _vit_like(name)
    return _detr_like(name)


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model, proc = make_tiny(name)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return Path(folder)
