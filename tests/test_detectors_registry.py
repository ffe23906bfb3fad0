"""The detector registry: spec errors and ``py:module:function`` factories (no model weights)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from mfdetr.detectors.base import FrozenDetector, LevelSpec
from mfdetr.detectors.registry import build_detector
from mfdetr.errors import MfdetrError

# ------------------------------------------------------------------------------------------- registry errors


def test_unknown_spec_lists_supported():
    with pytest.raises(MfdetrError) as e:
        build_detector("yolo:foo")
    msg = str(e.value)
    for s in (
        "hf:PATH",
        "shapes",
        "py:module:function",
        "DetrForObjectDetection",
        "RTDetrV2ForObjectDetection",
        "DFineForObjectDetection",
        "DeformableDetrForObjectDetection",
        "ConditionalDetrForObjectDetection",
    ):
        assert s in msg


# ------------------------------------------------------------------------------------------- py: factories

FACTORY_SRC = textwrap.dedent(
    """
    import torch
    from mfdetr.detectors.base import DetectorOutput, LevelSpec

    class Dummy:
        def __init__(self, topk=3, device="cpu"):
            self.spec = "dummy"
            self.levels = [LevelSpec("e8", 8, 4)]
            self.query_dim = 5
            self.fingerprint = "dummy-%d" % topk
            self.device = torch.device(device)
            self.topk = topk

        def input_size(self, orig_size):
            return tuple(orig_size)

        def to(self, device):
            self.device = torch.device(device)
            return self

        def detect(self, images):
            outs = []
            for im in images:
                h, w = im.shape[-2:]
                k = self.topk
                outs.append(DetectorOutput(
                    boxes=torch.tensor([[0.0, 0.0, w / 2, h / 2]]).repeat(k, 1), scores=torch.linspace(1, 0.5, k),
                    labels=torch.ones(k, dtype=torch.int64), queries=torch.zeros(k, 5),
                    features={"e8": torch.zeros(4, -(-h // 8), -(-w // 8))}, scale=(1.0, 1.0),
                    input_size=(h, w), orig_size=(h, w)))
            return outs

    def build(topk=3, device="cpu"):
        return Dummy(topk=topk, device=device)

    def build_nothing():
        return object()

    def build_bad_levels():
        d = Dummy()
        d.levels = ["e8"]
        return d
    """
)


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "mfdetr_test_factory.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mfdetr_test_factory"
    sys.modules.pop("mfdetr_test_factory", None)


def test_py_factory(factory_module):
    det = build_detector(f"py:{factory_module}:build", topk=4)
    assert isinstance(det, FrozenDetector)
    assert det.spec == f"py:{factory_module}:build"
    assert det.fingerprint == "dummy-4" and det.levels == [LevelSpec("e8", 8, 4)]
    (o,) = det.detect([torch.zeros((3, 30, 40), dtype=torch.uint8)])
    assert o.boxes.shape == (4, 4)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("py:{m}:build_nothing", "not a FrozenDetector"),
        ("py:{m}:build_bad_levels", "LevelSpec"),
        ("py:{m}:missing", "no callable"),
        ("py:no_such_module_xyz:build", "cannot import"),
        ("py:{m}", "py:module:function"),
    ],
)
def test_py_factory_errors(factory_module, spec, match):
    with pytest.raises(MfdetrError, match=match):
        build_detector(spec.format(m=factory_module))
