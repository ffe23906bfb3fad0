"""Coordinate frames: original pixels -> network input (resize, bottom-right padding) -> feature cells.

A bright object at a known place in the ORIGINAL image must change exactly the backbone feature cells that its box
maps onto (box * scale / stride, widened by the receptive field) and nothing else; this checks scale, input_size,
the crop of padded maps and the level strides together, for an aspect-preserving resize with a padded input
(DETR processor with ``pad_size``) and a non-uniform fixed-size resize (RT-DETR).
"""

from __future__ import annotations

import pytest
import torch

from mfdetr.detectors.registry import build_detector

transformers = pytest.importorskip("transformers")

from tests.hf_tiny import tiny_config  # noqa: E402

H0, W0 = 120, 200
BOX = (120, 40, 160, 70)  # x1, y1, x2, y2 in original pixels: a bright block


def _pair():
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 40, (3, H0, W0), generator=g, dtype=torch.uint8)
    obj = base.clone()
    x1, y1, x2, y2 = BOX
    obj[:, y1:y2, x1:x2] = 255
    return base, obj


def _folder(tmp_path, kind):
    t = transformers
    torch.manual_seed(0)
    # hf_tiny's models at half the width (a 8..64-channel ResNet), one decoder layer, 5 queries, one class
    small = dict(width=16, decoder_layers=1, queries=5, labels=dict(id2label={0: "a"}))
    if kind == "detr_padded":
        model = t.DetrForObjectDetection(tiny_config("detr", **small))
        # aspect-preserving resize (shortest edge 96 -> 96 x 160) then bottom-right padding to 128 x 192
        proc = t.DetrImageProcessor(
            size={"shortest_edge": 96, "longest_edge": 400},
            do_pad=True,
            pad_size={"height": 128, "width": 192},
        )
    else:
        model = t.RTDetrForObjectDetection(tiny_config("rt_detr", **small))
        # non-uniform fixed resize: sx = 160/200 = 0.8, sy = 64/120 = 0.533
        proc = t.RTDetrImageProcessor(size={"height": 64, "width": 160})
    folder = tmp_path / kind
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, expect_in", [("detr_padded", (96, 160)), ("rt_detr", (64, 160))])
def test_object_lands_on_its_feature_cells(tmp_path, kind, expect_in):
    det = build_detector(f"hf:{_folder(tmp_path, kind)}", levels=["b4", "b8"])
    base, obj = _pair()
    assert det.input_size((H0, W0)) == expect_in
    o_base, o_obj = det.detect([base, obj])
    h_in, w_in = o_obj.input_size
    assert (h_in, w_in) == expect_in
    sx, sy = o_obj.scale
    assert (sx, sy) == pytest.approx((w_in / W0, h_in / H0))
    x1, y1, x2, y2 = BOX
    for lv in det.levels:
        s = lv.stride
        f0, f1 = o_base.features[lv.name], o_obj.features[lv.name]
        assert f1.shape[-2:] == (-(-h_in // s), -(-w_in // s))
        diff = (f1 - f0).abs().sum(0)  # [h, w]
        changed = diff > 1e-5
        # cells the box covers, in this level's frame
        cx1, cx2 = x1 * sx / s, x2 * sx / s
        cy1, cy2 = y1 * sy / s, y2 * sy / s
        inside = torch.zeros_like(changed)
        inside[int(cy1) + 1 : int(cy2), int(cx1) + 1 : int(cx2)] = True
        assert changed[inside].all(), f"{kind}/{lv.name}: box interior cells unchanged"
        # receptive field margin (in cells) of a tiny ResNet up to this stage: changes stay near the box
        margin = 48 / s
        ys, xs = torch.nonzero(changed, as_tuple=True)
        assert xs.min() >= cx1 - margin and xs.max() <= cx2 + margin, (
            kind,
            lv.name,
            xs.min(),
            xs.max(),
            cx1,
            cx2,
        )
        assert ys.min() >= cy1 - margin and ys.max() <= cy2 + margin, (
            kind,
            lv.name,
            ys.min(),
            ys.max(),
            cy1,
            cy2,
        )
        # and the response is centred on the box (weighted centroid within 1.5 cells of the box centre)
        yy, xx = torch.meshgrid(torch.arange(diff.shape[0]), torch.arange(diff.shape[1]), indexing="ij")
        w = diff / diff.sum()
        cx = float((w * (xx + 0.5)).sum())
        cy = float((w * (yy + 0.5)).sum())
        assert abs(cx - (cx1 + cx2) / 2) < 1.5 and abs(cy - (cy1 + cy2) / 2) < 1.5, (kind, lv.name, cx, cy)


def test_padding_does_not_leak_into_crops(tmp_path):
    """With pad_size, maps are cropped to the valid (unpadded) region: a padded-away area is never returned."""
    det = build_detector(f"hf:{_folder(tmp_path, 'detr_padded')}", levels=["b4", "e32"])
    (o,) = det.detect([_pair()[1]])
    assert o.input_size == (96, 160)  # the pixel_mask's valid extent, not the padded 128 x 192
    assert o.features["b4"].shape[-2:] == (24, 40)
    assert o.features["e32"].shape[-2:] == (3, 5)


def test_boxes_come_back_in_original_pixels():
    """The trained shapes detector finds synth objects in an upscaled, non-square copy of a synth image."""
    from mfdetr.detectors.registry import shapes_available

    if not shapes_available():
        pytest.skip("shipped shapes weights absent (python tools/train_shapes_detector.py makes them)")
    from torchvision.ops import box_iou

    from mfdetr.data.synth_shapes import CATEGORIES, render_image

    det = build_detector("shapes", categories=[{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)])
    hits = total = 0
    for index in range(6):
        img, instances = render_image(9876, "val", index, 192)
        im = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        big = torch.nn.functional.interpolate(im[None].float(), size=(288, 384), mode="nearest")[0].to(
            torch.uint8
        )
        (o,) = det.detect([big])
        assert o.scale == pytest.approx((192 / 384, 192 / 288))
        for inst in instances:
            ys, xs = torch.nonzero(torch.from_numpy(inst.mask), as_tuple=True)
            if len(ys) < 400:  # medium and large objects only
                continue
            gt = torch.tensor([[xs.min() * 2.0, ys.min() * 1.5, (xs.max() + 1) * 2.0, (ys.max() + 1) * 1.5]])
            same = o.labels == inst.category_id
            total += 1
            if same.any() and box_iou(gt, o.boxes[same][:10]).max() > 0.7:
                hits += 1
    assert total >= 5 and hits / total >= 0.7, (hits, total)
