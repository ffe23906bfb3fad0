"""Typed configs of the mask network (``MaskNetConfig``) and its losses (``LossConfig``).

Both are plain dataclasses loadable from TOML through ``mfdetr.utils.config.from_dict``; every part
of the network is one option here, so an ablation is one ``--set model.X=...`` away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class MaskNetConfig:
    """The mask network (after Mask Frozen-DETR; see ``mfdetr/model/mask_net.py`` for the picture).

    head: ``"mfdetr"`` (the paper's network: image encoder -> box encoder -> query fusion -> dynamic
        mask logits, + mask-IoU head) or ``"fcn"`` (Mask R-CNN-style 4 conv + deconv baseline on the
        same mapped/fused features, no queries).
    dim: d', the width everything is mapped to (per-level 1x1 channel mapper C_l -> dim).
    levels: names of the cached levels to use (default: all levels of the cache, in cache order).
    fuse_stride: stride of the fused map; cached levels with a stride >= this are fused top-down
        (FPN style) into one map at this stride and refined; finer levels (e.g. a stride-4 backbone
        level when fusing at 8) are only channel-mapped and RoIAligned alongside (summed). Default 4:
        everything is fused and refined down to a stride-4 backbone level when the cache has one
        (at COCO resolution 8 quarters the image-level cost).
    image_encoder: ``"fpn"`` (top-down fusion + ``image_encoder_depth`` refine blocks at the fused
        stride) or ``"none"`` (no mixing: the mapped levels are RoIAligned and summed).
    image_encoder_depth: residual depthwise-separable conv blocks on the fused map (0 allowed).
    coarse_attn_layers: transformer layers of cross-level self-attention over the tokens of the
        coarsest fused levels (before the top-down fusion).
    coarse_attn_max_tokens: which levels join it, decided per batch from their sizes: from the
        coarsest down while the tokens per image stay within this (at least the coarsest level):
        at 192 px the stride-16 level (144 tokens), at COCO 640 px the stride-32 one (400 tokens).
    roi_size: RoIAlign output size S (box features S x S x box_dim).
    box_dim: width of the per-box features (the pooled maps are projected dim -> box_dim at the
        image level, which is cheap; per-box tensors R x box_dim x S x S dominate a CPU step, so
        this is the main speed lever; 0 = ``dim``).
    sampling_ratio: RoIAlign sampling ratio (-1 = adaptive, as torchvision).
    box_encoder: ``"conv"`` (residual depthwise-separable 3x3 blocks within each box), ``"attn"``
        (conv block + self-attention over a pooled 8x8 token grid of the box, with the query as an
        extra token) or ``"none"``.
    box_encoder_layers: number of box-encoder blocks.
    box_object_attn: with ``box_encoder = "attn"``, the pooled box tokens also attend to every valid
        object of the image (projected query + its box relative to this one): box-to-object
        attention, for occlusions.
    box_encoder_scale: 1 = the blocks run at S x S; 2 = they run at (S/2) x (S/2) on the 2x2
        average of the box features and their output is upsampled and added back to the S x S
        features (4x cheaper; the S x S detail still reaches the mask logits through the skip).
    object_attn_layers: transformer layers of self-attention among the projected queries of the
        valid boxes of each image (the paper's object-to-object attention; cheap: K tokens).
    query_fusion: how the projected decoder query conditions the box features before the box
        encoder: ``"film"`` (scale and shift per channel), ``"add"`` (add per channel) or ``"none"``.
    mask_predictor: ``"dot"`` (mask logit per pixel = box feature . projected query, the paper's
        dynamic mask head) or ``"conv"`` (a 1x1 conv, query-free).
    mask_upsample: the mask logits are bilinearly upsampled by this factor (M = roi_size * factor).
    query_prior: side G of a query-predicted shape prior (0 = off): an MLP maps the box's projected
        query to G x G logits, upsampled and added to the mask logits (zero-initialised), so the
        query's class/pose knowledge draws the coarse shape where the stride-4 features are too coarse
        (small boxes) and the features only have to place the boundary.
    iou_head: predict each box's mask IoU (mask scoring; final score = detection score x IoU).
    pixel_refine: side of the refined masks when the cache has a pixel level (``pxN``, the network-input
        RGB; ``mfdetr/model/pixel_refine.py``; either head): every cell of a pixel_refine x pixel_refine grid over the
        box gets the coarse logit plus an MLP's correction from the box features there and the RGB of
        a 3x3 pixel patch around it, so boundaries snap to image edges. 0 = never refine.
    refine_dim: hidden width of that MLP.
    refine_colour: the MLP also reads the cell's colour minus the box's object colour and minus its
        background colour (means over the box weighted by the coarse mask probability and its complement).
    refine_points: points per box the refinement is trained on (the most uncertain of the coarse logits,
        Mask2Former/PointRend importance sampling); refine_infer_points: cells refined per box at
        inference (the least certain; the others keep the upsampled coarse logit).
    fcn_roi_size / fcn_convs / fcn_dim: the FCN baseline's RoIAlign size, number of 3x3 convs and
        width (0 = ``dim``); its masks are ``2 * fcn_roi_size`` after the deconv.
    """

    head: Literal["mfdetr", "fcn"] = "mfdetr"
    dim: int = 128
    levels: list[str] | None = None
    fuse_stride: int = 4
    image_encoder: Literal["fpn", "none"] = "fpn"
    image_encoder_depth: int = 2
    coarse_attn_layers: int = 1
    coarse_attn_max_tokens: int = 600
    roi_size: int = 32
    box_dim: int = 64
    sampling_ratio: int = 2
    box_encoder: Literal["conv", "attn", "none"] = "attn"
    box_encoder_layers: int = 2
    box_object_attn: bool = True
    box_encoder_scale: int = 1
    object_attn_layers: int = 1
    query_fusion: Literal["film", "add", "none"] = "film"
    mask_predictor: Literal["dot", "conv"] = "dot"
    mask_upsample: int = 1
    query_prior: int = 0
    iou_head: bool = True
    pixel_refine: int = 64
    refine_dim: int = 32
    refine_colour: bool = True
    refine_points: int = 256
    refine_infer_points: int = 1024
    fcn_roi_size: int = 14
    fcn_convs: int = 4
    fcn_dim: int = 0


@dataclass
class LossConfig:
    """Mask and mask-IoU losses (``mfdetr/model/losses.py``).

    mask_loss: ``"point"`` (Mask2Former-style importance-sampled points) or ``"dense"`` (every cell
        of the target crop; the logits are bilinearly resampled to the target resolution).
    num_points: points per mask for ``"point"`` (Mask2Former: 12544 = 112^2 for 1/4-res masks;
        our target crops are 64^2 and our logits 32^2, so far fewer suffice).
    oversample_ratio / importance_sample_ratio: Mask2Former's uncertainty sampling: draw
        ``oversample_ratio * num_points`` random points, keep the ``importance_sample_ratio`` most
        uncertain (|logit| smallest), fill the rest uniformly at random.
    bce_weight / dice_weight: weights of the sigmoid BCE and dice terms (matched boxes only).
    iou_weight: weight of the mask-IoU regression.
    iou_loss: ``"bce"`` (cross-entropy of the IoU head's logit with the soft IoU target, minus the
        target's entropy, i.e. a KL divergence: never saturates, 0 when exact), ``"l2"`` or
        ``"smooth_l1"`` (on the predicted IoU), against the IoU of the
        thresholded predicted mask with the target crop (matched boxes) at the target resolution.
    iou_unmatched: also train the IoU head on unmatched valid boxes with target 0 (false positives
        and duplicates then get a low final score = detection score x predicted IoU).
    unmatched_per_image: how many unmatched valid boxes per image are sampled for that (0 = none).
    boundary_points: extra points per mask (``"point"`` loss) drawn on the target's boundary cells
        (where a 3x3 neighbourhood of the crop is not constant), jittered within the cell: the
        boundary band Boundary AP scores, sampled whatever the logits' current uncertainty.
    overlap_points: extra points per mask drawn where ANOTHER instance lies inside the box: in the
        intersection with the box of a different matched annotation of the image (the one that
        overlaps most), preferring the pixels that instance's own target crop marks as its own:
        the occlusion regions an instance-blind loss rarely samples (the answer there is 0).
    """

    mask_loss: Literal["point", "dense"] = "point"
    num_points: int = 1024
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_loss: Literal["bce", "l2", "smooth_l1"] = "bce"
    iou_unmatched: bool = True
    unmatched_per_image: int = 1
    boundary_points: int = 0
    overlap_points: int = 0
