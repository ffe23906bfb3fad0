"""The Hugging Face adapter and the detector registry, on tiny random models (no download, CPU, seconds).

Every listed class is built from a tiny random config, saved with save_pretrained (+ a small image processor) into
a session tmp folder and loaded back through ``build_detector("hf:PATH")``.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mfdetr.detectors.base import DetectorOutput, FrozenDetector, LevelSpec
from mfdetr.detectors.registry import build_detector
from mfdetr.errors import MfdetrError

ID2LABEL = {0: "disc", 1: "Square", 2: "big triangle"}
CATEGORIES = [{"id": 11, "name": "disc"}, {"id": 12, "name": "square"}, {"id": 13, "name": "Big_Triangle"},
              {"id": 14, "name": "star"}]
QUERIES = 12
ALL = ["detr", "conditional_detr", "deformable_detr", "deformable_detr_refine", "deformable_detr_two_stage",
       "rt_detr", "rt_detr_v2", "d_fine", "d_fine_hgnetv2"]
SIGMOID_TOPK_ARG = {"conditional_detr", "deformable_detr", "deformable_detr_refine", "deformable_detr_two_stage"}


def _resnet(out_features):
    return transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                      layer_type="basic", out_features=out_features)


def make_tiny(name: str):
    """(model, image processor) of a tiny random model of one supported class."""
    t = transformers
    common = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=QUERIES, id2label=ID2LABEL,
                  label2id={v: k for k, v in ID2LABEL.items()})
    detr_kw = dict(use_timm_backbone=False, use_pretrained_backbone=False)
    small = {"shortest_edge": 64, "longest_edge": 96}
    if name == "detr":
        model = t.DetrForObjectDetection(t.DetrConfig(backbone_config=_resnet(["stage4"]), **detr_kw, **common))
        return model, t.DetrImageProcessor(size=small)
    if name == "conditional_detr":
        model = t.ConditionalDetrForObjectDetection(
            t.ConditionalDetrConfig(backbone_config=_resnet(["stage4"]), **detr_kw, **common))
        return model, t.ConditionalDetrImageProcessor(size=small)
    if name.startswith("deformable_detr"):
        cfg = t.DeformableDetrConfig(
            backbone_config=_resnet(["stage2", "stage3", "stage4"]), **detr_kw, **common, num_feature_levels=4,
            encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=QUERIES,
            with_box_refine=name != "deformable_detr", two_stage=name == "deformable_detr_two_stage")
        return t.DeformableDetrForObjectDetection(cfg), t.DeformableDetrImageProcessor(size=small)
    backbone = t.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                    layer_type="basic", out_indices=[2, 3, 4])
    kw = dict(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, d_model=32,
              decoder_in_channels=[32, 32, 32], encoder_ffn_dim=32, decoder_ffn_dim=32, decoder_layers=2,
              encoder_attention_heads=2, decoder_attention_heads=2, num_queries=QUERIES, num_denoising=0,
              id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    proc = t.RTDetrImageProcessor(size={"height": 64, "width": 96})
    if name == "rt_detr":
        return t.RTDetrForObjectDetection(t.RTDetrConfig(**kw)), proc
    if name == "rt_detr_v2":
        return t.RTDetrV2ForObjectDetection(t.RTDetrV2Config(**kw)), proc
    if name == "d_fine":
        return t.DFineForObjectDetection(t.DFineConfig(**kw)), proc
    if name == "d_fine_hgnetv2":  # D-FINE's own backbone family
        kw["backbone_config"] = t.HGNetV2Config(
            hidden_sizes=[16, 32, 64, 128], stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64],
            stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 32, 64, 128], stage_num_blocks=[1, 1, 1, 1],
            stage_numb_of_layers=[1, 1, 1, 1], stage_downsample=[False, True, True, True],
            stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5],
            out_features=["stage2", "stage3", "stage4"])
        return t.DFineForObjectDetection(t.DFineConfig(**kw)), proc
    raise KeyError(name)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """name -> folder of a saved tiny model of each supported class."""
    root = tmp_path_factory.mktemp("hf_tiny")
    out = {}
    for i, name in enumerate(ALL):
        torch.manual_seed(1000 + i)
        model, proc = make_tiny(name)
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
        out[name] = root / name
    return out


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 70, 90), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (3, 50, 41), generator=g, dtype=torch.uint8)]


def _reference(folder, name, image, k):
    """Independent forward + HF post_process on one image: (outputs, post-processed dict sorted by score)."""
    from transformers import AutoImageProcessor

    cls = getattr(transformers, type_name(name))
    model = cls.from_pretrained(str(folder)).eval()
    proc = AutoImageProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        enc = proc(images=[image], return_tensors="pt")
        out = model(**enc)
    size = [tuple(image.shape[-2:])]
    if name in SIGMOID_TOPK_ARG:
        res = proc.post_process_object_detection(out, threshold=0.0, target_sizes=size, top_k=k)[0]
    else:
        res = proc.post_process_object_detection(out, threshold=0.0, target_sizes=size)[0]
    order = res["scores"].argsort(descending=True, stable=True)[:k]
    return out, {key: v[order] for key, v in res.items()}, enc


def type_name(name):
    from mfdetr.detectors.hf import SUPPORTED

    mt = name if name in SUPPORTED else ("d_fine" if name.startswith("d_fine") else "deformable_detr")
    return SUPPORTED[mt][0]


@pytest.mark.parametrize("name", ALL)
def test_contract_and_equals_post_process(hf_folders, name):
    k = 8
    det = build_detector(f"hf:{hf_folders[name]}", topk=k)
    assert isinstance(det, FrozenDetector)
    assert det.query_dim == 32
    assert [lv.name for lv in det.levels][0] == "b4" and det.levels[0].stride == 4
    assert all(lv.name.startswith("e") for lv in det.levels[1:]) and len(det.levels) >= 2
    images = _images()
    outs = det.detect(images)
    assert len(outs) == 2
    for im, o in zip(images, outs):
        assert isinstance(o, DetectorOutput)
        H0, W0 = im.shape[-2:]
        assert o.orig_size == (H0, W0)
        h_in, w_in = det.input_size((H0, W0))
        assert o.input_size == (h_in, w_in)
        assert o.scale == pytest.approx((w_in / W0, h_in / H0))
        assert o.boxes.shape == (k, 4) and o.boxes.dtype == torch.float32
        assert o.scores.shape == (k,) and o.scores.dtype == torch.float32
        assert o.labels.shape == (k,) and o.labels.dtype == torch.int64
        assert o.queries.shape == (k, 32) and o.queries.dtype == torch.float32
        assert torch.all(o.scores[:-1] >= o.scores[1:])
        assert torch.all(o.boxes[:, 0] >= 0) and torch.all(o.boxes[:, 2] <= W0)
        assert torch.all(o.boxes[:, 1] >= 0) and torch.all(o.boxes[:, 3] <= H0)
        assert torch.all(o.boxes[:, 2] >= o.boxes[:, 0]) and torch.all(o.boxes[:, 3] >= o.boxes[:, 1])
        assert set(o.labels.tolist()) <= {0, 1, 2}
        assert list(o.features) == [lv.name for lv in det.levels]
        for lv in det.levels:
            f = o.features[lv.name]
            assert f.dtype == torch.float32
            assert f.shape == (lv.channels, -(-h_in // lv.stride), -(-w_in // lv.stride)), lv

        # equal to HF post-processing, and queries are the decoder's last hidden state of each box's query
        ref_out, ref, enc = _reference(hf_folders[name], name, im, k)
        rb = ref["boxes"].clone()
        rb[:, 0::2] = rb[:, 0::2].clamp(0, W0)
        rb[:, 1::2] = rb[:, 1::2].clamp(0, H0)
        torch.testing.assert_close(o.scores, ref["scores"], rtol=0, atol=1e-6)
        assert torch.equal(o.labels, ref["labels"])
        torch.testing.assert_close(o.boxes, rb, rtol=0, atol=1e-4)
        q = o.extras["query_index"]
        torch.testing.assert_close(o.queries, ref_out.last_hidden_state[0, q], rtol=0, atol=1e-5)
        if name == "detr":
            prob = ref_out.logits[0].softmax(-1)[q, o.labels]
        else:
            prob = ref_out.logits[0].sigmoid()[q, o.labels]
        torch.testing.assert_close(o.scores, prob, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["detr", "deformable_detr_two_stage", "rt_detr"])
def test_batched_equals_one_by_one(hf_folders, name):
    det = build_detector(f"hf:{hf_folders[name]}", topk=6)
    a, b = _images()
    c = torch.flip(a, dims=[-1]).contiguous()  # same size as a: batched together
    together = det.detect([a, b, c])
    for im, o in zip([a, b, c], together):
        (single,) = det.detect([im])
        torch.testing.assert_close(o.boxes, single.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(o.scores, single.scores, rtol=0, atol=1e-5)
        assert torch.equal(o.labels, single.labels)
        torch.testing.assert_close(o.queries, single.queries, rtol=0, atol=1e-4)
        for n in o.features:
            torch.testing.assert_close(o.features[n], single.features[n], rtol=0, atol=1e-4)


def test_label_mapping_by_name_and_file(hf_folders, tmp_path):
    folder = hf_folders["rt_detr"]
    det = build_detector(f"hf:{folder}", categories=CATEGORIES, topk=30)
    labels = torch.cat([o.labels for o in det.detect(_images())])
    assert set(labels.tolist()) <= {11, 12, 13} and len(set(labels.tolist())) >= 2
    # only "disc" maps: every kept box is a disc; the others are dropped before the top-k
    det1 = build_detector(f"hf:{folder}", categories=[{"id": 7, "name": "DISC"}], topk=5)
    o = det1.detect(_images())[0]
    assert o.labels.tolist() == [7] * 5
    # an explicit mapping file
    mp = tmp_path / "map.json"
    mp.write_text(json.dumps({"1": 12, "2": 13}))
    det2 = build_detector(f"hf:{folder}", categories=CATEGORIES, topk=5, label_map=mp)
    assert set(det2.detect(_images())[0].labels.tolist()) <= {12, 13}
    assert det2.fingerprint != det.fingerprint
    with pytest.raises(MfdetrError, match="nothing|no class"):
        build_detector(f"hf:{folder}", categories=[{"id": 1, "name": "cat"}])
    mp.write_text(json.dumps({"1": 99}))
    with pytest.raises(MfdetrError, match="99"):
        build_detector(f"hf:{folder}", categories=CATEGORIES, label_map=mp)


def test_detr_label_mapping_masks_classes(hf_folders):
    det = build_detector(f"hf:{hf_folders['detr']}", categories=[{"id": 5, "name": "square"}], topk=QUERIES)
    o = det.detect(_images())[0]
    assert o.labels.tolist() == [5] * QUERIES  # every query's best MAPPED class is "square"


def test_levels_option_and_errors(hf_folders):
    folder = hf_folders["deformable_detr"]
    det = build_detector(f"hf:{folder}", levels=["e16", "b8"])
    assert [(lv.name, lv.stride) for lv in det.levels] == [("e16", 16), ("b8", 8)]
    o = det.detect(_images()[:1])[0]
    assert list(o.features) == ["e16", "b8"]
    with pytest.raises(MfdetrError, match="available.*e64"):
        build_detector(f"hf:{folder}", levels=["e128"])


def test_fingerprint(hf_folders):
    f = hf_folders["conditional_detr"]
    a = build_detector(f"hf:{f}")
    assert a.fingerprint == build_detector(f"hf:{f}").fingerprint
    assert a.fingerprint != build_detector(f"hf:{f}", topk=50).fingerprint
    assert a.fingerprint != build_detector(f"hf:{f}", levels=["e32"]).fingerprint
    assert a.fingerprint != build_detector(f"hf:{hf_folders['detr']}").fingerprint


def test_input_size_predicts_processor(hf_folders):
    from transformers import AutoImageProcessor

    for name in ("detr", "rt_detr"):
        det = build_detector(f"hf:{hf_folders[name]}")
        proc = AutoImageProcessor.from_pretrained(str(hf_folders[name]))
        for hw in [(70, 90), (50, 41), (123, 37), (64, 96), (301, 200)]:
            enc = proc(images=[torch.zeros((3, *hw), dtype=torch.uint8)], return_tensors="pt")
            assert det.input_size(hw) == tuple(enc["pixel_values"].shape[-2:]), (name, hw)


def test_rt_detr_input_not_multiple_of_32_is_padded(hf_folders, tmp_path):
    import shutil

    from transformers import RTDetrImageProcessor

    folder = tmp_path / "rt"
    shutil.copytree(hf_folders["rt_detr"], folder)
    RTDetrImageProcessor(size={"height": 80, "width": 100}).save_pretrained(folder)
    det = build_detector(f"hf:{folder}", topk=5)
    o = det.detect(_images())[0]
    assert o.input_size == (80, 100)
    for lv in det.levels:
        assert o.features[lv.name].shape[-2:] == (-(-80 // lv.stride), -(-100 // lv.stride))
    assert torch.all(o.boxes[:, 2] <= 90) and torch.all(o.boxes[:, 3] <= 70)


def test_device_and_to(hf_folders):
    det = build_detector(f"hf:{hf_folders['rt_detr']}", device="cpu")
    assert det.to("cpu") is det and det.device == torch.device("cpu")
    o = det.detect(_images()[:1])[0]
    assert o.boxes.device.type == "cpu"
    assert not torch.is_grad_enabled() or not o.queries.requires_grad


def test_bad_images_rejected(hf_folders):
    det = build_detector(f"hf:{hf_folders['rt_detr']}")
    with pytest.raises(MfdetrError, match="uint8"):
        det.detect([torch.rand(3, 20, 20)])
    with pytest.raises(MfdetrError, match=r"\[3,H,W\]"):
        det.detect([torch.zeros((1, 20, 20), dtype=torch.uint8)])


# ------------------------------------------------------------------------------------------- registry errors


def test_unknown_spec_lists_supported():
    with pytest.raises(MfdetrError) as e:
        build_detector("yolo:foo")
    msg = str(e.value)
    for s in ("hf:PATH", "shapes", "py:module:function", "DetrForObjectDetection", "RTDetrV2ForObjectDetection",
              "DFineForObjectDetection", "DeformableDetrForObjectDetection", "ConditionalDetrForObjectDetection"):
        assert s in msg


def test_hf_folder_errors(tmp_path, hf_folders):
    with pytest.raises(MfdetrError, match="not found"):
        build_detector(f"hf:{tmp_path / 'nope'}")
    bad = tmp_path / "bert"
    bad.mkdir()
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8).save_pretrained(bad)
    with pytest.raises(MfdetrError, match="not supported.*RTDetrForObjectDetection"):
        build_detector(f"hf:{bad}")
    timm_cfg = tmp_path / "timm_detr"
    timm_cfg.mkdir()
    c = transformers.DetrConfig(num_queries=4)
    assert c.backbone_config.model_type == "timm_backbone"  # the default: real DETR checkpoints need timm
    c.save_pretrained(timm_cfg)
    (timm_cfg / "model.safetensors").write_bytes(b"")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MfdetrError, match="timm"):
            build_detector(f"hf:{timm_cfg}")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((hf_folders["rt_detr"] / "config.json").read_text())
    with pytest.raises(MfdetrError, match="no weight file"):
        build_detector(f"hf:{noweights}")


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
