"""The shipped ``shapes`` detector: loads through the hf: adapter, has the documented levels, and detects.

The AP check runs on a small val split of a seed never used in training (training uses seed 0); the acceptance
number (300 images, seed 1234) is in mfdetr/detectors/weights/shapes/train_meta.json.
"""

from __future__ import annotations

import json

import pytest
import torch

from mfdetr.detectors import registry
from mfdetr.detectors.registry import SHAPES_DIR, build_detector, shapes_available
from mfdetr.errors import MfdetrError

needs_weights = pytest.mark.skipif(
    not shapes_available(),
    reason=f"shipped weights absent from {SHAPES_DIR}: python tools/train_shapes_detector.py",
)


def test_missing_weights_error_says_how_to_reproduce(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "SHAPES_DIR", tmp_path / "shapes")
    with pytest.raises(MfdetrError, match="train_shapes_detector.py"):
        build_detector("shapes")


@needs_weights
def test_shipped_folder():
    files = {p.name: p.stat().st_size for p in SHAPES_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "train_meta.json"} <= set(files)
    assert sum(files.values()) <= 15e6
    cfg = json.loads((SHAPES_DIR / "config.json").read_text())
    assert cfg["model_type"] == "rt_detr"
    from mfdetr.data.synth_shapes import CATEGORIES

    assert [cfg["id2label"][str(i)] for i in range(len(CATEGORIES))] == CATEGORIES


@needs_weights
def test_shapes_contract():
    from mfdetr.data.synth_shapes import CATEGORIES

    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    det = build_detector("shapes", categories=cats)
    assert det.spec == "shapes"
    strides = json.loads((SHAPES_DIR / "config.json").read_text())["feat_strides"]
    assert [(lv.name, lv.stride) for lv in det.levels] == [("b4", 4)] + [(f"e{s}", s) for s in strides]
    assert det.input_size((192, 192)) == (192, 192)
    assert det.input_size((100, 300)) == (192, 192)
    im = torch.zeros((3, 100, 300), dtype=torch.uint8)
    (o,) = det.detect([im])
    assert o.scale == pytest.approx((192 / 300, 192 / 100))
    for lv in det.levels:
        assert o.features[lv.name].shape[-2:] == (192 // lv.stride, 192 // lv.stride)
    assert set(o.labels.tolist()) <= set(range(1, 7))
    assert det.fingerprint == build_detector("shapes", categories=cats).fingerprint


@needs_weights
def test_shapes_box_ap_on_unseen_seed(tmp_path):
    from mfdetr.data.synth import make_synth
    from mfdetr.evaluate.coco_eval import detector_box_ap as box_ap

    make_synth(tmp_path, train=0, val=40, size=192, seed=4321, workers=1)
    ann = tmp_path / "val" / "annotations.json"
    cats = json.loads(ann.read_text())["categories"]
    det = build_detector("shapes", categories=cats)
    res = box_ap(det, ann, tmp_path / "val" / "images")
    assert res["images"] == 40
    assert res["AP"] >= 0.55, res  # 0.71 on the 300-image seed-1234 acceptance split
