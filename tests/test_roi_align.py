"""Fused multi-level RoIAlign == the sum over levels of torchvision's roi_align (docs/DESIGN.md)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from mfdetr.ops import multilevel_roi_align

IMG_H, IMG_W = 60, 76  # network-input frame
STRIDES = (4, 8, 16)
SCALES = [1.0 / s for s in STRIDES]


def _features(batch=3, channels=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, -(-IMG_H // s), -(-IMG_W // s), generator=g).to(dtype) for s in STRIDES
    ]


def _edge_boxes() -> torch.Tensor:
    H, W = float(IMG_H), float(IMG_W)
    return torch.tensor(
        [
            [-50.0, -40.0, -20.0, -10.0],  # fully outside, top-left
            [W + 10, H + 10, W + 60, H + 30],  # fully outside, bottom-right
            [-30.0, 10.0, 20.0, 30.0],  # partly outside (left)
            [50.0, -25.0, 90.0, 20.0],  # partly outside (top, right)
            [20.0, 20.0, 20.0, 20.0],  # zero size
            [10.0, 12.0, 10.0, 40.0],  # zero width
            [5.0, 33.0, 45.0, 33.0],  # zero height
            [30.3, 17.6, 31.1, 18.2],  # smaller than a cell at every level
            [0.0, 0.0, W, H],  # full image
            [W - 1.0, H - 1.0, W, H],  # at the far edge
            [W - 9.5, H - 7.25, W, H],  # ending at the far edge
            [-8.0, -8.0, W + 8.0, H + 8.0],  # larger than the image
            [1.5, 2.5, 70.25, 9.75],  # long and thin
            [40.0, 30.0, 25.0, 10.0],  # reversed corners
            [11.0, 7.0, 52.0, 58.0],  # ordinary
        ]
    )


def _random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(n, 2).uniform_(0.0, 4.2, generator=g))  # 1 .. 67 px
    xy = torch.rand(n, 2, generator=g) * torch.tensor([IMG_W, IMG_H]) - wh / 4
    return torch.cat([xy, xy + wh], dim=1)


def _rois(boxes_per_image):
    return torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes_per_image)]
    )


def _tv_sum(features, rois, size, sr, aligned, per_level=False):
    outs = [tv_roi_align(f, rois, size, s, sr, aligned) for f, s in zip(features, SCALES)]
    return torch.stack(outs, 1) if per_level else sum(outs)


def _assert_close(ours, ref, features):
    scale = max(float(f.detach().abs().max()) for f in features)
    assert ours.shape == ref.shape
    diff = float((ours.detach().double() - ref.detach().double()).abs().max()) if ref.numel() else 0.0
    assert diff <= 1e-5 * scale, f"max abs diff {diff:.3g} > 1e-5 * {scale:.3g}"


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("size", [7, 14, 28, 32])
@pytest.mark.parametrize("sr", [1, 2, 3, -1])
def test_matches_torchvision_sum(sr, size, aligned):
    feats = _features()
    edge = _edge_boxes()
    # uneven boxes per image, including an image with none
    rois = _rois([torch.cat([edge, _random_boxes(4, 1)]), torch.zeros(0, 4), _random_boxes(9, 2)])
    ours = multilevel_roi_align(feats, rois, SCALES, size, sr, aligned)
    _assert_close(ours, _tv_sum(feats, rois, size, sr, aligned), feats)


def test_rectangular_output_and_list_of_boxes():
    feats = _features()
    boxes = [_edge_boxes(), torch.zeros(0, 4), _random_boxes(5, 3)]
    ours = multilevel_roi_align(feats, boxes, SCALES, (7, 12), -1, True)
    ref = _tv_sum(feats, _rois(boxes), (7, 12), -1, True)
    _assert_close(ours, ref, feats)
    # the [R,5] form gives the same
    assert torch.equal(ours, multilevel_roi_align(feats, _rois(boxes), SCALES, (7, 12)))


@pytest.mark.parametrize("sr", [2, -1])
def test_per_level(sr):
    feats = _features()
    rois = _rois([_random_boxes(6, 4), _edge_boxes(), torch.zeros(0, 4)])
    ours = multilevel_roi_align(feats, rois, SCALES, 14, sr, True, per_level=True)
    assert ours.shape == (rois.shape[0], len(feats), feats[0].shape[1], 14, 14)
    _assert_close(ours, _tv_sum(feats, rois, 14, sr, True, per_level=True), feats)
    summed = multilevel_roi_align(feats, rois, SCALES, 14, sr, True)
    torch.testing.assert_close(ours.sum(1), summed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_level", [False, True])
def test_empty_rois(per_level):
    feats = [f.requires_grad_() for f in _features()]
    C, L = feats[0].shape[1], len(feats)
    shape = (0, L, C, 7, 7) if per_level else (0, C, 7, 7)
    for rois in (torch.zeros(0, 5), [torch.zeros(0, 4)] * 3, []):
        out = multilevel_roi_align(feats, rois, SCALES, 7, per_level=per_level)
        assert out.shape == shape and out.dtype == feats[0].dtype
        out.sum().backward()  # connected to the graph, zero gradient
        assert all(float(f.grad.abs().max()) == 0.0 for f in feats)


def test_float64():
    feats = _features(dtype=torch.float64)
    rois = _rois([_random_boxes(5, 5), _edge_boxes(), _random_boxes(2, 6)]).double()
    ours = multilevel_roi_align(feats, rois, SCALES, 7, -1, True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, _tv_sum(feats, rois, 7, -1, True), atol=1e-12, rtol=0)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    feats = [
        torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    rois = torch.tensor(
        [
            [0, 1.0, 2.0, 17.0, 13.0],
            [1, -3.0, 4.0, 9.0, 30.0],
            [1, 15.0, 15.0, 16.0, 16.5],
            [0, 0, 0, 24, 20],
        ],
        dtype=torch.float64,
    )
    for sr, per_level in ((-1, False), (2, True)):

        def fn(*fs, sr=sr, per_level=per_level):
            return multilevel_roi_align(list(fs), rois, [1 / 4, 1 / 8], 3, sr, True, per_level)

        assert torch.autograd.gradcheck(fn, tuple(feats), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("sr,aligned", [(-1, True), (2, True), (3, False)])
def test_gradients_match_torchvision(sr, aligned):
    feats = [f.requires_grad_() for f in _features(seed=3)]
    rois = _rois([_random_boxes(7, 8), _edge_boxes(), torch.zeros(0, 4)])
    size = 7
    gout = torch.randn(
        rois.shape[0], feats[0].shape[1], size, size, generator=torch.Generator().manual_seed(9)
    )
    (multilevel_roi_align(feats, rois, SCALES, size, sr, aligned) * gout).sum().backward()
    ours = [f.grad.clone() for f in feats]
    for f in feats:
        f.grad = None
    (_tv_sum(feats, rois, size, sr, aligned) * gout).sum().backward()
    for a, f in zip(ours, feats):
        assert a.shape == f.shape
        torch.testing.assert_close(a, f.grad, atol=1e-5 * float(gout.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    feats = [f.to(dtype) for f in _features(seed=4)]
    rois = _rois([_random_boxes(6, 10), _edge_boxes(), _random_boxes(3, 11)])
    ours = multilevel_roi_align(feats, rois, SCALES, 14, -1, True)
    assert ours.dtype == dtype
    ref = _tv_sum([f.float() for f in feats], rois, 14, -1, True)  # same inputs, float32 math
    scale = float(ref.abs().max())
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3  # one rounding of the result
    assert float((ours.float() - ref).abs().max()) <= tol * scale
    feats = [f.requires_grad_() for f in feats]
    multilevel_roi_align(feats, rois, SCALES, 14).float().sum().backward()
    assert all(f.grad is not None and f.grad.dtype == dtype for f in feats)


def test_bad_arguments():
    feats = _features()
    with pytest.raises(ValueError):
        multilevel_roi_align(feats, torch.zeros(3, 4), SCALES, 7)
    with pytest.raises(ValueError):
        multilevel_roi_align(feats, torch.zeros(0, 5), SCALES[:2], 7)
    with pytest.raises(ValueError):
        multilevel_roi_align([feats[0], feats[1][:, :2]], torch.zeros(0, 5), SCALES[:2], 7)


def test_feature_layouts_and_split(monkeypatch):
    """Channels-last and cropped (non-contiguous) maps; the int32-overflow split path."""
    import mfdetr.ops.taps as taps

    base = _features(seed=5)
    rois = _rois([_random_boxes(5, 12), _edge_boxes(), _random_boxes(4, 13)])
    ref = _tv_sum(base, rois, 7, -1, True)
    cl = [f.contiguous(memory_format=torch.channels_last).requires_grad_() for f in base]
    out = multilevel_roi_align(cl, rois, SCALES, 7)
    _assert_close(out, ref, base)
    out.sum().backward()
    assert all(f.grad.is_contiguous(memory_format=torch.channels_last) for f in cl)
    padded = [torch.nn.functional.pad(f, (0, 3, 0, 2)) for f in base]
    cropped = [p[:, :, : f.shape[2], : f.shape[3]] for p, f in zip(padded, base)]
    _assert_close(multilevel_roi_align(cropped, rois, SCALES, 7), ref, base)
    monkeypatch.setattr(taps, "MAX_TAPS", 5000)
    _assert_close(multilevel_roi_align(base, rois, SCALES, 7), ref, base)


@pytest.mark.parametrize("per_level", [False, True])
def test_thread_pool_path(monkeypatch, per_level):
    """The CPU path split over 2 worker threads (forced: no load-based reduction) gives the same."""
    from mfdetr.ops import parallel

    monkeypatch.setattr(parallel, "DYNAMIC_THREADS", False)
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 4096)  # many chunks even on tiny inputs
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feats = [f.requires_grad_() for f in _features(seed=6)]
        rois = _rois([_random_boxes(9, 14), _edge_boxes(), _random_boxes(6, 15)])
        out = multilevel_roi_align(feats, rois, SCALES, 14, -1, True, per_level)
        ref_feats = [f.detach().clone().requires_grad_() for f in feats]
        ref = _tv_sum(ref_feats, rois, 14, -1, True, per_level)
        _assert_close(out, ref, feats)
        gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
        (out * gout).sum().backward()
        (ref * gout).sum().backward()
        for a, b in zip(feats, ref_feats):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * float(gout.abs().max()), rtol=0)
    finally:
        torch.set_num_threads(n)


def test_inference_and_no_grad_modes():
    feats = _features(seed=8)
    rois = _rois([_random_boxes(4, 16), torch.zeros(0, 4), _random_boxes(3, 17)])
    with torch.inference_mode():  # (the reused workspace must stay usable outside inference mode)
        a = multilevel_roi_align(feats, rois, SCALES, 7)
    with torch.no_grad():
        b = multilevel_roi_align(feats, rois, SCALES, 7)
    assert torch.equal(a, b)
    _assert_close(b, _tv_sum(feats, rois, 7, -1, True), feats)
