"""Pixel levels (``pxN``: the network-input RGB, any detector) and the pixel refinement of the masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfdetr.detectors.base import LevelSpec
from mfdetr.detectors.pixels import PixelLevels, pixel_map, pixel_stride, split_pixel_levels
from mfdetr.errors import MfdetrError
from mfdetr.model import build_mask_net
from mfdetr.model.config import LossConfig, MaskNetConfig
from mfdetr.model.losses import compute_losses
from mfdetr.model.pixel_refine import PATCH, RGB_MEAN, RGB_STD, PixelRefiner
from tests.synth_batches import LEVELS, SyntheticCache

pytestmark = pytest.mark.usefixtures("one_thread")


def test_level_names_and_split():
    assert [pixel_stride(n) for n in ("px1", "px2", "px16", "b4", "px", "px0", "e8")] == [
        1,
        2,
        16,
        0,
        0,
        0,
        0,
    ]
    assert split_pixel_levels(None) == (None, [])
    assert split_pixel_levels(["b4", "px1", "e8"]) == (["b4", "e8"], ["px1"])
    with pytest.raises(MfdetrError, match="only pixel levels"):
        split_pixel_levels(["px1"])
    with pytest.raises(MfdetrError, match="twice"):
        split_pixel_levels(["b4", "px2", "px2"])


def test_pixel_map_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    im = torch.randint(0, 256, (3, 11, 14), dtype=torch.uint8, generator=g)
    assert torch.equal(pixel_map(im, (11, 14), 1), im.float())  # no resize: the image itself, exactly
    out = pixel_map(im, (11, 14), 4)
    assert out.shape == (3, 3, 4)  # ceil(11/4), ceil(14/4)
    a = im.numpy().astype(np.float64)
    for i in range(3):
        for j in range(4):
            ref = a[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].mean(axis=(1, 2))  # partial cells: their pixels
            assert np.allclose(out[:, i, j].numpy(), ref, atol=1e-4)
    flat = torch.full((3, 40, 30), 77, dtype=torch.uint8)
    assert torch.allclose(pixel_map(flat, (20, 16), 2), torch.full((3, 10, 8), 77.0))  # resized, constant


class _Inner:
    def __init__(self):
        self.spec, self.query_dim, self.fingerprint = "inner", 4, "f" * 64
        self.levels = [LevelSpec("e8", 8, 5)]
        self.label_map = {1: 7}
        self.device = torch.device("cpu")

    def input_size(self, orig):
        return (orig[0] // 2, orig[1] // 2)

    def detect(self, images):
        from mfdetr.detectors.base import DetectorOutput

        out = []
        for im in images:
            h, w = self.input_size(tuple(im.shape[-2:]))
            out.append(
                DetectorOutput(
                    boxes=torch.zeros(1, 4),
                    scores=torch.ones(1),
                    labels=torch.ones(1, dtype=torch.int64),
                    queries=torch.zeros(1, 4),
                    features={"e8": torch.zeros(5, -(-h // 8), -(-w // 8))},
                    scale=(0.5, 0.5),
                    input_size=(h, w),
                    orig_size=tuple(im.shape[-2:]),
                )
            )
        return out

    def to(self, device):
        return self


def test_pixel_levels_wrap_any_detector():
    inner = _Inner()
    det = PixelLevels(inner, ["px2"])
    assert [lv.name for lv in det.levels] == ["e8", "px2"] and det.levels[1] == LevelSpec("px2", 2, 3)
    assert det.label_map == {1: 7} and det.spec == "inner" and det.query_dim == 4
    assert det.fingerprint != inner.fingerprint != PixelLevels(inner, ["px1"]).fingerprint
    assert det.fingerprint == PixelLevels(_Inner(), ["px2"]).fingerprint
    im = torch.randint(0, 256, (3, 30, 42), dtype=torch.uint8)
    (o,) = det.detect([im])
    assert set(o.features) == {"e8", "px2"} and o.features["px2"].shape == (
        3,
        8,
        11,
    )  # ceil(15/2), ceil(21/2)
    assert torch.allclose(o.features["px2"], pixel_map(im, (15, 21), 2))


def _bilinear(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """float64 bilinear read of ``img`` [3,H,W] at pixel-centre coordinates, borders clamped."""
    h, w = img.shape[1:]
    x, y = min(max(x - 0.5, 0.0), w - 1.0), min(max(y - 0.5, 0.0), h - 1.0)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = x - x0, y - y0
    top = (1 - ax) * img[:, y0, x0] + ax * img[:, y0, x1]
    bot = (1 - ax) * img[:, y1, x0] + ax * img[:, y1, x1]
    return (1 - ay) * top + ay * bot


def test_patches_read_the_pixels_one_input_pixel_apart():
    g = torch.Generator().manual_seed(1)
    stride = 2
    ref = PixelRefiner(LevelSpec("px2", stride, 3), feat_dim=4, size=8)
    pixels = torch.randint(0, 256, (2, 3, 20, 24), generator=g).float()
    rois = torch.tensor([[0, 3.0, 5.0, 30.0, 33.0], [1, 10.0, 2.0, 21.0, 9.5]])
    coords = torch.rand(2, 5, 2, generator=g)
    got = ref.patches(pixels, rois, coords).view(2, 5, 3, PATCH, PATCH)
    for r in range(2):
        img = pixels[int(rois[r, 0])].double().numpy()
        x1, y1, x2, y2 = rois[r, 1:].double().tolist()
        for p in range(5):
            cx = x1 + float(coords[r, p, 0]) * (x2 - x1)
            cy = y1 + float(coords[r, p, 1]) * (y2 - y1)
            for i, dy in enumerate((-1, 0, 1)):
                for j, dx in enumerate((-1, 0, 1)):
                    want = (_bilinear(img, (cx + dx) / stride, (cy + dy) / stride) - RGB_MEAN) / RGB_STD
                    assert np.allclose(got[r, p, :, i, j].double().numpy(), want, atol=1e-4)


def test_colours_are_the_mask_weighted_means():
    g = torch.Generator().manual_seed(3)
    ref = PixelRefiner(LevelSpec("px1", 1, 3), feat_dim=4, size=8)
    logits = torch.randn(2, 4, 4, generator=g) * 3
    pixels = torch.rand(2, 3, 12, 12, generator=g) * 255
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 10.0], [1, 0.0, 0.0, 12.0, 12.0]])
    got = ref.colours(logits, pixels, rois).double()
    for r in range(2):
        x1, y1, x2, y2 = rois[r, 1:].double().tolist()
        img = pixels[int(rois[r, 0])].double().numpy()
        p = torch.sigmoid(logits[r].double()).numpy()
        rgb = np.zeros((4, 4, 3))
        for i in range(4):
            for j in range(4):
                x, y = x1 + (j + 0.5) / 4 * (x2 - x1), y1 + (i + 0.5) / 4 * (y2 - y1)
                rgb[i, j] = (_bilinear(img, x, y) - RGB_MEAN) / RGB_STD
        obj = (p[..., None] * rgb).sum((0, 1)) / p.sum()
        bg = ((1 - p)[..., None] * rgb).sum((0, 1)) / (1 - p).sum()
        assert np.allclose(got[r, 0].numpy(), obj, atol=1e-4) and np.allclose(
            got[r, 1].numpy(), bg, atol=1e-4
        )


def test_dense_refines_the_least_certain_cells_and_starts_at_the_coarse_masks():
    g = torch.Generator().manual_seed(2)
    ref = PixelRefiner(LevelSpec("px1", 1, 3), feat_dim=4, size=8)
    logits = torch.randn(3, 4, 4, generator=g)
    feats = ref.project(torch.randn(3, 4, 4, 4, generator=g)).detach()
    pixels = torch.rand(1, 3, 16, 16, generator=g) * 255
    rois = torch.tensor([[0, 0.0, 0.0, 16.0, 16.0], [0, 2.0, 3.0, 9.0, 12.0], [0, 5.0, 1.0, 7.0, 4.0]])
    up = torch.nn.functional.interpolate(logits[:, None], size=(8, 8), mode="bilinear")[:, 0]
    assert torch.allclose(ref.dense(logits, feats, pixels, rois, 64), up, atol=1e-6)  # zero-initialised
    torch.nn.init.normal_(ref.mlp[-1].weight, generator=g)
    full = ref.dense(logits, feats, pixels, rois, 64)
    grid = (torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="xy"), -1) + 0.5) / 8
    pts = ref.point_logits(logits, feats, pixels, rois, grid.reshape(1, 64, 2).expand(3, -1, -1))
    assert torch.allclose(full, pts.view(3, 8, 8), atol=1e-5)  # every cell: the point function on the grid
    part = ref.dense(logits, feats, pixels, rois, 10)
    changed = (part != up).flatten(1).sum(1)
    assert bool((changed <= 10).all()) and bool((changed > 0).all())
    least = (-up.flatten(1).abs()).topk(10, dim=1).indices
    assert torch.allclose(part.flatten(1).gather(1, least), full.flatten(1).gather(1, least), atol=1e-5)


def test_refiner_learns_to_snap_a_blurred_mask_to_the_image_edge():
    """Coarse logits that only know the object's rough extent, and an image with its sharp edge: the
    trained refiner's masks are far closer to the truth than the coarse ones."""
    torch.manual_seed(0)
    n, m = 24, 32
    edge = torch.rand(n) * 0.5 + 0.25  # the object covers x < edge of each box
    cells = (torch.arange(m) + 0.5) / m
    truth = (cells[None, None, :] < edge[:, None, None]).expand(n, m, m).float()
    # coarse: a smooth ramp centred 0.1 box widths off the edge (4x4 logits, wrong by a few pixels)
    c = (torch.arange(4) + 0.5) / 4
    logits = (-(c[None, None, :] - (edge + 0.1)[:, None, None]) * 12).expand(n, 4, 4).contiguous()
    pixels = torch.zeros(n, 3, 64, 64)
    for i in range(n):  # box i spans the whole image i; object pixels bright
        pixels[i, :, :, : int(round(float(edge[i]) * 64))] = 220.0
    rois = torch.cat(
        [torch.arange(n, dtype=torch.float)[:, None], torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(n, 4)], 1
    )
    ref = PixelRefiner(LevelSpec("px1", 1, 3), feat_dim=2, size=m, width=16)
    feats = torch.zeros(n, 2, 4, 4)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(150):
        coords = torch.rand(n, 128, 2)
        lab = (coords[..., 0] < edge[:, None]).float()
        out = ref.point_logits(logits, ref.project(feats), pixels, rois, coords)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def iou(lg):
        p = lg > 0
        return float(((p & truth.bool()).sum((1, 2)) / (p | truth.bool()).sum((1, 2))).mean())

    with torch.no_grad():
        coarse = iou(torch.nn.functional.interpolate(logits[:, None], size=(m, m), mode="bilinear")[:, 0])
        refined = iou(ref.dense(logits, ref.project(feats), pixels, rois, m * m))
    assert coarse < 0.85 and refined > 0.97 and refined > coarse + 0.1


def _batch_and_net(**cfg):
    ds = SyntheticCache(6, levels=LEVELS + [LevelSpec("px1", 1, 3)], mask_size=32)
    batch = ds.collate([ds[i] for i in range(6)])
    net_cfg = MaskNetConfig(dim=16, box_dim=8, roi_size=8, coarse_attn_layers=0, **cfg)
    return ds, batch, build_mask_net(net_cfg, ds.levels, ds.query_dim)


def test_mask_net_with_a_pixel_level():
    torch.manual_seed(0)
    ds, batch, net = _batch_and_net(pixel_refine=32, refine_points=40, refine_infer_points=100)
    assert [lv.name for lv in net.levels] == [lv.name for lv in LEVELS] and net.pixel_level.name == "px1"
    assert net.mask_size == 32
    net.train()
    out = net(batch)
    r = out["rows"].shape[0]
    assert out["mask_logits"].shape == (r, 8, 8) and out["refine_logits"].shape == (r, 40)
    assert out["refine_coords"].shape == (r, 40, 2)
    loss, _ = compute_losses(out, batch, LossConfig(num_points=32))
    loss.backward()
    assert all(p.grad is not None for p in net.refiner.parameters())
    net.eval()
    with torch.no_grad():
        ev = net(batch)
    assert ev["mask_logits"].shape == (r, 32, 32) and "refine_logits" not in ev
    # without a pixel level in the cache, or with pixel_refine = 0: the coarse head, as before
    plain = build_mask_net(MaskNetConfig(dim=16, box_dim=8, roi_size=8), LEVELS, ds.query_dim)
    assert plain.refiner is None and plain.mask_size == 8
    assert _batch_and_net(pixel_refine=0)[2].refiner is None
    with pytest.raises(MfdetrError, match="pixel level"):
        build_mask_net(MaskNetConfig(levels=["s4", "px1"]), ds.levels, ds.query_dim)


def test_fcn_head_refines_too_and_pixel_refine_0_keeps_the_baseline():
    torch.manual_seed(0)
    ds, batch, fcn = _batch_and_net(head="fcn", fcn_roi_size=4, fcn_dim=8, pixel_refine=24, refine_points=16)
    assert fcn.refiner is not None and fcn.mask_size == 24
    fcn.eval()
    with torch.no_grad():
        assert fcn(batch)["mask_logits"].shape[-1] == 24
    base = _batch_and_net(head="fcn", fcn_roi_size=4, fcn_dim=8, pixel_refine=0)[2]
    assert base.refiner is None and base.mask_size == 8
