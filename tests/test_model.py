"""The mask network: forward contract (both heads, every ablation option), checks, overfitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mfdetr.errors import MfdetrError
from mfdetr.model import build_mask_net, count_parameters
from mfdetr.model.config import LossConfig, MaskNetConfig
from mfdetr.model.losses import compute_losses
from tests.synth_batches import SyntheticCache
from tests.tiny_train import small_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    ds = SyntheticCache(8, scale=0.75)
    return ds, ds.collate([ds[i] for i in range(4)])


VARIANTS = [
    {},
    {"head": "fcn"},
    {"head": "fcn", "iou_head": False},
    {"box_encoder": "conv"},
    {"box_object_attn": False},
    {"box_encoder": "none"},
    {"box_encoder_scale": 2},
    {"query_fusion": "add"},
    {"query_fusion": "none", "mask_predictor": "conv"},
    {"image_encoder": "none"},
    {"image_encoder_depth": 0, "coarse_attn_layers": 0, "object_attn_layers": 0},
    {"fuse_stride": 4, "coarse_attn_max_tokens": 100},
    {"fuse_stride": 32},
    {"levels": ["s8", "s16"]},
    {"mask_upsample": 2, "iou_head": False},
    {"box_dim": 0},
    {"query_prior": 8},
]


@pytest.mark.parametrize(
    "opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_forward_contract(data, opts):
    ds, batch = data
    torch.manual_seed(0)
    cfg = small_net(**opts)
    net = build_mask_net(cfg, ds.levels, ds.query_dim)
    out = net(batch)
    rows = batch["valid"].nonzero()
    r = rows.shape[0]
    m = net.mask_size
    assert torch.equal(out["rows"], rows)  # default select = valid, row-major (b, k)
    assert out["mask_logits"].shape == (r, m, m) and out["mask_logits"].dtype == torch.float32
    assert out["iou_pred"].shape == (r,)
    assert float(out["iou_pred"].detach().min()) >= 0 and float(out["iou_pred"].detach().max()) <= 1
    if not cfg.iou_head:
        assert torch.equal(out["iou_pred"], torch.ones(r))
    expect_m = (2 * cfg.fcn_roi_size if cfg.head == "fcn" else cfg.roi_size) * cfg.mask_upsample
    assert m == expect_m
    # an explicit selection: the selected rows only, same order
    sel = torch.zeros_like(batch["valid"])
    sel[3, 1] = sel[0, 2] = sel[0, 0] = True
    out2 = net(batch, sel)
    assert out2["rows"].tolist() == [[0, 0], [0, 2], [3, 1]]
    assert torch.allclose(
        out2["mask_logits"][1], out["mask_logits"][(rows == torch.tensor([0, 2])).all(1)][0], atol=1e-5
    )
    # every parameter takes part (DDP needs it) and gets a finite gradient
    batch_t = dict(batch)
    loss, _ = compute_losses(out, batch_t, LossConfig(num_points=64))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} unused"
        assert torch.isfinite(p.grad).all(), name


def test_rois_use_the_scale_and_the_default_is_small(data):
    ds, batch = data
    net = build_mask_net(small_net(), ds.levels, ds.query_dim)
    _, strides, rows, rois = net.features_and_rois(batch, None)
    b, k = rows[:, 0], rows[:, 1]
    assert torch.allclose(rois[:, 1:], batch["boxes"][b, k] * 0.75)
    assert torch.equal(rois[:, 0], b.float())
    assert strides == [4]  # default fuse_stride 4: every level fused onto one stride-4 map
    net8 = build_mask_net(small_net(fuse_stride=8), ds.levels, ds.query_dim)
    assert net8.features_and_rois(batch, None)[1] == [
        8,
        4,
    ]  # the fused map (strides >= 8) + the finer s4 level
    # the default (paper) config at the shapes setting stays light
    from mfdetr.detectors.base import LevelSpec

    levels = [
        LevelSpec("b4", 4, 32),
        LevelSpec("e4", 4, 128),
        LevelSpec("e8", 8, 128),
        LevelSpec("e16", 16, 128),
    ]
    assert count_parameters(build_mask_net(MaskNetConfig(), levels, 128)) < 1_500_000


def test_padded_batch_of_different_sizes(data):
    ds, _ = data
    other = SyntheticCache(4, size=48, scale=1.0, seed=3)
    recs = [ds[0], other[1]]  # input 48x48 and 48x48 (0.75 x 64) vs 48: make one smaller
    recs[1] = SyntheticCache(4, size=40, seed=4)[0]
    batch = ds.collate(recs)
    assert batch["features"]["s4"].shape[-1] == 12 and int(batch["feat_size"][1, 0, 1]) == 10
    net = build_mask_net(small_net(coarse_attn_max_tokens=80), ds.levels, ds.query_dim)
    out = net(batch)
    assert torch.isfinite(out["mask_logits"]).all()


def test_clear_errors_for_levels_channels_and_query_width(data):
    ds, batch = data
    with pytest.raises(MfdetrError, match=r"level\(s\) \['e32'\].*s4"):
        build_mask_net(small_net(levels=["s8", "e32"]), ds.levels, ds.query_dim)
    net = build_mask_net(small_net(), ds.levels, ds.query_dim)
    bad = dict(batch, features=dict(batch["features"], s8=batch["features"]["s8"][:, :5]))
    with pytest.raises(
        MfdetrError, match=r"'s8' has 5 channels in the batch but the mask network was built for 12"
    ):
        net(bad)
    with pytest.raises(MfdetrError, match=r"width 7 but .* built for 16"):
        net(dict(batch, queries=batch["queries"][..., :7]))
    with pytest.raises(MfdetrError, match="no feature level 's16'"):
        net(dict(batch, features={k: v for k, v in batch["features"].items() if k != "s16"}))


@pytest.mark.parametrize("head", ["mfdetr", "fcn"])
def test_overfits_one_fixed_batch(data, head):
    ds, batch = data
    torch.manual_seed(0)
    net = build_mask_net(small_net(head=head), ds.levels, ds.query_dim)
    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    lc = LossConfig(mask_loss="dense")
    losses = []
    for _ in range(80):
        out = net(batch)
        loss, _ = compute_losses(out, batch, lc)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_pointwise_equals_a_1x1_conv_on_both_layouts():
    """Both Pointwise paths (wide NCHW input: batched matmul in place; otherwise channels-last linear)
    equal a float64 1x1 convolution, forward and weight/bias gradients."""
    from mfdetr.model.image_encoder import Pointwise

    torch.manual_seed(0)
    for c_in, c_out, channels_last in ((48, 16, False), (48, 16, True), (16, 48, False)):
        pw = Pointwise(c_in, c_out)
        x = torch.randn(2, c_in, 7, 9)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = pw(x)
        w64 = pw.weight.detach().double().requires_grad_()
        b64 = pw.bias.detach().double().requires_grad_()
        ref = F.conv2d(x.double(), w64[:, :, None, None], b64)
        assert y.shape == ref.shape and torch.allclose(y.double(), ref, atol=1e-5)
        g = torch.randn_like(ref)
        (y.double() * g).sum().backward()
        (ref * g).sum().backward()
        assert torch.allclose(pw.weight.grad.double(), w64.grad, atol=1e-4)
        assert torch.allclose(pw.bias.grad.double(), b64.grad, atol=1e-4)
