"""The Hugging Face adapter and the detector registry, on tiny random models (no download, CPU, seconds).

Every DETR-family class of transformers (``tests/hf_tiny.py``: a tiny random config of each, incl. timm
backbones) is saved with save_pretrained (+ its image processor) into a session tmp folder and loaded back
through ``build_detector("hf:PATH")``; outputs are checked against an independent forward of the saved model
and its processor's own ``post_process_object_detection``.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mfdetr.detectors.base import DetectorOutput, FrozenDetector  # noqa: E402
from mfdetr.detectors.hf_features import backbone_module, backbone_output_maps  # noqa: E402
from mfdetr.detectors.registry import build_detector  # noqa: E402
from mfdetr.errors import MfdetrError  # noqa: E402
from tests.hf_tiny import ALL, CLASSES, QUERIES, WIDTH, save_tiny  # noqa: E402

CATEGORIES = [
    {"id": 11, "name": "disc"},
    {"id": 12, "name": "square"},
    {"id": 13, "name": "Big_Triangle"},
    {"id": 14, "name": "star"},
]
_CNN = ["b4", "b8", "b16", "b32"]
# the levels each family offers (README table); tiny configs: LW-DETR's projector at scales 2 and 0.5
LEVELS = {
    "detr": _CNN + ["e32"],
    "conditional_detr": _CNN + ["e32"],
    "dab_detr": _CNN + ["e32"],
    "table_transformer": _CNN + ["e32"],
    "detr_timm": ["b2"] + _CNN + ["e32"],
    **{
        n: _CNN + ["e8", "e16", "e32", "e64"]
        for n in ("deformable_detr", "deformable_detr_refine", "deformable_detr_two_stage")
    },
    "deformable_detr_timm": ["b2"] + _CNN + ["e8", "e16", "e32", "e64"],
    **{
        n: _CNN + ["e8", "e16", "e32"]
        for n in ("rt_detr", "rt_detr_v2", "d_fine", "d_fine_hgnetv2", "deimv2")
    },
    "lw_detr": ["b16", "e8", "e32"],
    "rf_detr": ["b16", "e16"],
    "rf_detr_seg": ["b16", "e16"],
}


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """name -> folder of a saved tiny model of each class."""
    root = tmp_path_factory.mktemp("hf_tiny")
    return {name: save_tiny(name, root / name, seed=1000 + i) for i, name in enumerate(ALL)}


def _images():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (3, 70, 90), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (3, 50, 41), generator=g, dtype=torch.uint8),
    ]


def _reference(folder, name, image, k):
    """Independent forward + the processor's own post-processing on one image:
    (model, outputs, post-processed dict sorted by score, processor inputs)."""
    from transformers import AutoImageProcessor

    model = getattr(transformers, CLASSES[name]).from_pretrained(str(folder)).eval()
    proc = AutoImageProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        enc = proc(images=[image], return_tensors="pt")
        out = model(**enc)
    size = [tuple(image.shape[-2:])]
    params = inspect.signature(proc.post_process_object_detection).parameters
    extra = {"top_k": k} if "top_k" in params else {}
    res = proc.post_process_object_detection(out, threshold=0.0, target_sizes=size, **extra)[0]
    order = res["scores"].argsort(descending=True, stable=True)[:k]
    return model, out, {key: v[order] for key, v in res.items()}, enc


def _memory_reference(model, out, enc, name):
    """The model's multi-scale memory computed without the adapter: a list of [C, h, w] maps, or None."""
    mem = getattr(out, "encoder_last_hidden_state", None)
    if isinstance(mem, (list, tuple)):  # RT-DETR family
        return [m[0] for m in mem]
    if name.startswith(("lw_detr", "rf_detr")):  # no encoder: the projector over the ViT
        inner = model.model.model if name == "rf_detr_seg" else model.model
        with torch.no_grad():
            feats = inner.backbone(enc["pixel_values"], enc["pixel_mask"])
        feats = feats if isinstance(feats, list) else [feats]
        return [f[0][0] for f in feats]
    return None if mem is None else mem[0]  # flattened: [N, C], checked by the caller


def _check_levels(det, o, ref_model, ref_out, enc, name):
    h_in, w_in = o.input_size
    assert [lv.name for lv in det.levels] == LEVELS[name]
    for lv in det.levels:
        f = o.features[lv.name]
        assert f.dtype == torch.float32 and lv.stride == int(lv.name[1:])
        assert f.shape == (lv.channels, -(-h_in // lv.stride), -(-w_in // lv.stride)), lv
    enc_levels = [lv for lv in det.levels if lv.name.startswith("e")]
    mem = _memory_reference(ref_model, ref_out, enc, name)
    if isinstance(mem, list):
        assert len(mem) == len(enc_levels)
        for lv, m in zip(enc_levels, mem):
            torch.testing.assert_close(o.features[lv.name], m, rtol=0, atol=1e-4)
    elif mem is not None:  # flattened memory: the levels, in order, are its consecutive row blocks
        flat = torch.cat([o.features[lv.name].flatten(1).T for lv in enc_levels])
        torch.testing.assert_close(flat, mem, rtol=0, atol=1e-4)
    # b levels: the backbone's own output maps (deepest of each stride), run standalone
    with torch.no_grad():
        maps = backbone_output_maps(backbone_module(ref_model)(enc["pixel_values"]))
    assert maps
    b_levels = [lv.name for lv in det.levels if lv.name.startswith("b")]
    by_shape = {tuple(o.features[n].shape[-2:]): n for n in b_levels}
    for m in maps:
        deepest = [x for x in maps if x.shape[-2:] == m.shape[-2:]][-1]
        torch.testing.assert_close(o.features[by_shape[tuple(m.shape[-2:])]], deepest[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_contract_and_equals_post_process(hf_folders, name, one_thread):
    k = 8
    det = build_detector(f"hf:{hf_folders[name]}", topk=k)
    assert isinstance(det, FrozenDetector)
    assert det.query_dim == WIDTH
    default = [n for n in LEVELS[name] if n == "b4" or n.startswith("e")]
    assert [lv.name for lv in det.levels] == default
    det = build_detector(f"hf:{hf_folders[name]}", topk=k, levels=LEVELS[name])
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
        assert o.queries.shape == (k, WIDTH) and o.queries.dtype == torch.float32
        assert torch.all(o.scores[:-1] >= o.scores[1:])
        assert torch.all(o.boxes[:, 0] >= 0) and torch.all(o.boxes[:, 2] <= W0)
        assert torch.all(o.boxes[:, 1] >= 0) and torch.all(o.boxes[:, 3] <= H0)
        assert set(o.labels.tolist()) <= {0, 1, 2}

        # equal to the processor's post-processing; queries = the decoder's last hidden state of each box
        ref_model, ref_out, ref, enc = _reference(hf_folders[name], name, im, k)
        assert tuple(enc["pixel_values"].shape[-2:]) == (h_in, w_in)
        rb = ref["boxes"].clone()
        rb[:, 0::2] = rb[:, 0::2].clamp(0, W0)
        rb[:, 1::2] = rb[:, 1::2].clamp(0, H0)
        torch.testing.assert_close(o.scores, ref["scores"], rtol=0, atol=1e-6)
        assert torch.equal(o.labels, ref["labels"])
        torch.testing.assert_close(o.boxes, rb, rtol=0, atol=1e-4)
        q = o.extras["query_index"]
        torch.testing.assert_close(o.queries, ref_out.last_hidden_state[0, q], rtol=0, atol=1e-5)
        if det.score_kind == "softmax":
            assert ref_out.logits.shape[-1] == len(ref_model.config.id2label) + 1  # a no-object column
            prob = ref_out.logits[0].softmax(-1)[q, o.labels]
        else:
            prob = ref_out.logits[0].sigmoid()[q, o.labels]
        torch.testing.assert_close(o.scores, prob, rtol=0, atol=1e-6)
        _check_levels(det, o, ref_model, ref_out, enc, name)


def test_rt_detr_without_focal_loss_ranks_like_its_processor(tmp_path, one_thread):
    # use_focal_loss=False: RTDetrImageProcessor means the softmax without the last column, best class/query
    # (transformers 5.x calls softmax without dim=, i.e. over the batch: every score is 1 for one image; the
    # reference here is the intended per-query softmax over classes)
    folder = save_tiny("rt_detr", tmp_path / "rt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["use_focal_loss"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    det = build_detector(f"hf:{folder}", topk=QUERIES)
    assert det.score_kind == "softmax"
    im = _images()[0]
    (o,) = det.detect([im])
    _, out, _, _ = _reference(folder, "rt_detr", im, QUERIES)
    scores, labels = out.logits[0].softmax(-1)[:, :-1].max(-1)
    order = scores.argsort(descending=True, stable=True)
    torch.testing.assert_close(o.scores, scores[order], rtol=0, atol=1e-6)
    assert torch.equal(o.labels, labels[order]) and set(o.labels.tolist()) <= {0, 1}
    assert torch.equal(o.extras["query_index"], order)


def test_a_model_lacking_what_the_mask_network_needs_is_a_clear_error(tmp_path):
    # YOLOS: an object-detection head whose last_hidden_state is the ViT's whole token sequence (no decoder)
    folder = tmp_path / "yolos"
    cfg = transformers.YolosConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=[32, 32],
        patch_size=16,
        num_detection_tokens=4,
        id2label={0: "disc"},
    )
    transformers.YolosForObjectDetection(cfg).save_pretrained(folder)
    transformers.YolosImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(folder)
    with pytest.raises(MfdetrError, match="YolosForObjectDetection.*last_hidden_state has .* rows"):
        build_detector(f"hf:{folder}")


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


def test_hf_folder_errors(tmp_path, hf_folders):
    with pytest.raises(MfdetrError, match="not found"):
        build_detector(f"hf:{tmp_path / 'nope'}")
    bad = tmp_path / "bert"
    bad.mkdir()
    transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(bad)
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
