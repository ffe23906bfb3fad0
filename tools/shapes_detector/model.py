"""The shipped ``shapes`` architecture: a small RT-DETR (Hugging Face ``RTDetrForObjectDetection``)."""

from __future__ import annotations

CATEGORY_NAMES = ["disc", "square", "triangle", "star", "ring", "cross"]  # make_synth order, checked on load

ARCHS = {
    # strides 4, 8, 16 into the encoder (half the objects are < 32 px); 3-stage backbone
    "s4": dict(
        emb=32, hidden=[32, 64, 128], depths=[1, 1, 1], out_indices=[1, 2, 3], strides=[4, 8, 16], enc=64
    ),
    # the usual RT-DETR layout: strides 8, 16, 32 into the encoder; the stride-4 stage stays reachable by
    # a hook
    "s8": dict(
        emb=32,
        hidden=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        out_indices=[2, 3, 4],
        strides=[8, 16, 32],
        enc=64,
    ),
}


def build_config(
    num_labels: int,
    id2label: dict[int, str],
    size: int,
    arch: str = "s8",
    queries: int = 30,
    dec_layers: int = 3,
):
    """The shipped architecture: a small RT-DETR (about 2-3M parameters)."""
    from transformers import RTDetrConfig, RTDetrResNetConfig

    a = ARCHS[arch]
    enc_in = [a["hidden"][i - 1] for i in a["out_indices"]]
    backbone = RTDetrResNetConfig(
        embedding_size=a["emb"],
        hidden_sizes=a["hidden"],
        depths=a["depths"],
        layer_type="basic",
        out_indices=a["out_indices"],
    )
    return RTDetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        freeze_backbone_batch_norms=False,  # from scratch: BatchNorm must learn
        encoder_in_channels=enc_in,
        feat_strides=a["strides"],
        encoder_hidden_dim=a["enc"],
        encoder_ffn_dim=256,
        encoder_attention_heads=8,
        encoder_layers=1,
        hidden_expansion=1.0,
        d_model=128,
        decoder_in_channels=[a["enc"]] * 3,
        decoder_ffn_dim=512,
        decoder_layers=dec_layers,
        decoder_attention_heads=8,
        decoder_n_points=4,
        num_feature_levels=3,
        num_queries=queries,
        num_denoising=50,
        num_labels=num_labels,
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
        anchor_image_size=None,
    )


def build_processor(size: int):
    from transformers import RTDetrImageProcessor

    return RTDetrImageProcessor(size={"height": size, "width": size}, do_normalize=False, do_pad=False)
