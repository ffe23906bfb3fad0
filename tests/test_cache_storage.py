"""Storage levers (int8 quantization, PCA projection, box masking): numerics against independent
references, decoding within each lever's stated error against the float32 detector outputs,
fingerprints, SIGKILL + resume byte-equality, and the disk-space refusal."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch

from mfdetr.cache.reader import CacheDataset
from mfdetr.cache.schema import ExtractOptions, estimate_image_bytes
from mfdetr.cache.storage import box_region, dequantize, fit_pca, project, quant_params, quantize
from mfdetr.data.coco import CocoDataset
from mfdetr.errors import MfdetrError
from tests.fake_detector import REPO_ROOT, FakeDetector, make_small_synth, subprocess_env
from tests.tiny_cache import assert_same_tree, done_mask, extract_cmd, fake_extract, kill_mid_run

N, BLOCK, TOPK = 8, 2, 10
F16_REL = 2.0**-11  # float16 rounding of the decoded values (the cache's storage precision)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    images, ann = make_small_synth(root / "data", n=N, size=96, seed=4)
    ds = CocoDataset(ann, images)
    det = FakeDetector(categories=ds.categories, topk=TOPK)
    truth = [det.detect([ds[i].image])[0] for i in range(N)]  # float32 source, in position order
    return root, images, ann, truth


def _extract(root, images, ann, name, **kw):
    opts = ExtractOptions(topk=TOPK, block=BLOCK, calib_images=3, **kw)
    return fake_extract(images, ann, root / f"{name}.zarr", opts)


# -- numerics --------------------------------------------------------------------------------------


def test_quantize_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 9, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 5.0])[:, None, None]
    for bits in (8, 5):
        p = quant_params(x, bits)
        q = quantize(x, p, bits)
        assert q.dtype == np.uint8 and int(q.max()) <= 2**bits - 1
        err = (dequantize(q, p).double() - x.double()).abs().amax(dim=(1, 2)).numpy()
        assert np.all(err <= p[:, 1].astype(np.float64) / 2 * (1 + 1e-5) + 1e-7)
        assert err[3] == 0.0  # a constant channel is exact


def test_pca_matches_a_float64_svd_and_is_exact_on_low_rank_maps():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    mix = torch.randn(10, 3, generator=g, dtype=torch.float64)
    maps = [(torch.einsum("ck,khw->chw", mix, base * (1 + i)) + 0.5).float() for i in range(3)]
    mu, basis = fit_pca(maps, 3)
    x = np.concatenate([m.double().reshape(10, -1).numpy() for m in maps], axis=1)
    u, s, _ = np.linalg.svd(x - x.mean(axis=1, keepdims=True), full_matrices=False)
    # same subspace as the reference's top-3 left singular vectors
    assert np.allclose(np.abs(basis.T.astype(np.float64) @ u[:, :3]), np.eye(3), atol=1e-4)
    y = project(maps[1], mu, basis)
    recon = (
        torch.from_numpy(basis).double() @ y.double().reshape(3, -1) + torch.from_numpy(mu).double()[:, None]
    )
    assert torch.allclose(recon.reshape(10, 6, 6), maps[1].double(), atol=1e-4)


def test_box_region_matches_a_cell_by_cell_reference():
    boxes = np.array([[3.0, 5.0, 20.0, 13.0], [40.0, 40.0, 41.0, 44.0], [0, 0, 0, 0]], np.float32)
    scale, stride, hw, margin = (0.5, 0.75), 4, (12, 10), 1
    got = box_region(boxes, 2, scale, stride, hw, margin).numpy()
    ref = np.zeros(hw, bool)
    for x0, y0, x1, y1 in boxes[:2]:
        for r in range(hw[0]):
            for c in range(hw[1]):
                # cell [c*s, (c+1)*s) overlaps the box (input px), after growing the box by the margin
                if (
                    (c + 1) * stride > x0 * scale[0] - margin * stride
                    and c * stride < x1 * scale[0] + margin * stride
                    and (r + 1) * stride > y0 * scale[1] - margin * stride
                    and r * stride < y1 * scale[1] + margin * stride
                ):
                    ref[r, c] = True
    assert got.any() and (got == ref).all()


# -- decoding through extract + CacheDataset, against the float32 source ----------------------------


def test_int8_per_image_decodes_within_half_a_step(data):
    root, images, ann, truth = data
    ds = CacheDataset(_extract(root, images, ann, "q8", quant="int8").path)
    g = ds._get_group()
    assert g["feat/f8"].dtype == np.uint8 and ds.levels[0].channels == 8
    for j, o in enumerate(truth):
        rec = ds[j]
        for name in ("f8", "f16"):
            x = o.features[name].double()
            p = np.asarray(g[f"qparams/{name}"][j])
            err = (rec["features"][name].double() - x).abs().amax(dim=(1, 2)).numpy()
            bound = p[:, 1] / 2 + F16_REL * x.abs().amax(dim=(1, 2)).numpy() + 1e-7
            assert np.all(err <= bound), (j, name)


def test_int8_calibrated_decodes_within_half_a_step_inside_its_range(data):
    root, images, ann, truth = data
    ds = CacheDataset(_extract(root, images, ann, "q8c", quant="int8-calib").path)
    assert "storage" in ds.attrs and ds.attrs["storage"]["calib_images"] == 3
    codec = ds.storage_codec
    for j, o in enumerate(truth):
        rec = ds[j]
        for name in ("f8", "f16"):
            lo, step = codec.levels[name].calib[:, 0], codec.levels[name].calib[:, 1]
            hi = lo + step * 255.01  # float32 rounding of lo + 255 steps
            x = o.features[name].double()
            inside = (x >= torch.from_numpy(lo).double()[:, None, None]) & (
                x <= torch.from_numpy(hi).double()[:, None, None]
            )
            err = (rec["features"][name].double() - x).abs()
            bound = torch.from_numpy(step / 2).double()[:, None, None] + F16_REL * x.abs() + 1e-7
            assert bool((err <= bound)[inside].all())
            if j < 3:  # the calibration images are inside the range everywhere
                assert bool(inside.all())


def test_projection_and_box_mask_decode_to_the_projected_masked_source(data):
    root, images, ann, truth = data
    res = _extract(root, images, ann, "pb", project={"f8": 4}, box_mask=["f8"], box_margin=1)
    ds = CacheDataset(res.path)
    assert [(lv.name, lv.channels) for lv in ds.levels] == [("f8", 4), ("f16", 8)]
    assert ds.attrs["detector"]["levels"][0]["source_channels"] == 8
    lc = ds.storage_codec.levels["f8"]
    for j, o in enumerate(truth):
        rec = ds[j]
        n = min(TOPK, o.boxes.shape[0])
        y = project(o.features["f8"], lc.mean, lc.basis)
        reg = box_region(o.boxes[:n].numpy(), n, o.scale, 8, tuple(y.shape[1:]), 1)
        got = rec["features"]["f8"]
        assert got.shape == y.shape
        assert bool((got[:, ~reg] == 0).all()) and bool(reg.any())
        assert torch.allclose(got[:, reg], y[:, reg], rtol=F16_REL, atol=1e-6)
        assert torch.equal(rec["features"]["f16"], o.features["f16"].half().float())  # untouched level
    # the projection's error is the PCA residual: on the calibration images it is the optimum of every
    # rank-4 affine approximation (a float64 SVD of the same pixels)
    src = np.concatenate([o.features["f8"].double().reshape(8, -1).numpy() for o in truth[:3]], axis=1)
    centred = src - src.mean(axis=1, keepdims=True)
    s_vals = np.linalg.svd(centred, compute_uv=False)
    best = np.sqrt((s_vals[4:] ** 2).sum())
    b = lc.basis.astype(np.float64)
    mine = np.linalg.norm(centred - b @ (b.T @ centred))
    assert mine <= best * (1 + 1e-3) + 1e-6 and best / np.linalg.norm(centred) < 0.1


def test_storage_levers_change_the_fingerprint_and_are_refused_on_mismatch(data):
    root, images, ann, _ = data
    plain = ExtractOptions(topk=TOPK, block=BLOCK)
    assert set(plain.to_attrs()) == {
        "topk",
        "levels",
        "dtype",
        "codec",
        "codec_level",
        "keepbits",
        "mask_size",
        "match",
        "block",
    }  # older caches keep their fingerprints
    a = _extract(root, images, ann, "fp", quant="int8")
    b = _extract(root, images, ann, "fp2", quant="int8", quant_bits=6)
    c = _extract(root, images, ann, "fp3", box_mask=["f8"])
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    with pytest.raises(MfdetrError, match="options.quant"):
        fake_extract(
            images, ann, a.path, ExtractOptions(topk=TOPK, block=BLOCK, quant="int8-calib", calib_images=3)
        )
    with pytest.raises(MfdetrError, match="project names level"):
        _extract(root, images, ann, "bad", project={"nope": 2})
    with pytest.raises(MfdetrError, match="exceeds"):
        _extract(root, images, ann, "bad2", project={"f8": 99})


# -- kill + resume ---------------------------------------------------------------------------------


def _cli(images, ann, out, extra):
    return extract_cmd(
        images, ann, out, topk=TOPK, block=BLOCK, writers=1, extra=["--calib-images", "3", *extra]
    )


@pytest.mark.parametrize(
    "extra,kw",
    [  # every lever at once: per-image params, a calibration read back, zeros
        (
            ["--quant", "int8", "--quant-bits", "6", "--project", "f8=4", "--box-mask", "f16"],
            dict(quant="int8", quant_bits=6, project={"f8": 4}, box_mask=["f16"]),
        ),
    ],
)
def test_sigkill_then_resume_gives_the_same_bytes(data, extra, kw):
    root, images, ann, _ = data
    tag = "-".join(x.strip("-") for x in extra).replace("=", "").replace(",", "")
    ref, out = root / f"ref-{tag}.zarr", root / f"killed-{tag}.zarr"
    _extract(root, images, ann, f"ref-{tag}", **kw)  # uninterrupted, in this process (same bytes as the CLI)
    kill_mid_run(_cli(images, ann, out, extra), out, N, min_done=BLOCK, sleep="0.3", settle=0.2)
    assert BLOCK <= done_mask(out, N).sum() < N
    subprocess.run(
        _cli(images, ann, out, extra), cwd=REPO_ROOT, env=subprocess_env(), check=True, capture_output=True
    )
    assert_same_tree(ref, out)


# -- size estimate and the disk check --------------------------------------------------------------


def test_estimate_follows_the_schema_and_the_disk_check_refuses(data, monkeypatch):
    root, images, ann, _ = data
    levels = [{"name": "b4", "stride": 4, "channels": 256}, {"name": "e8", "stride": 8, "channels": 256}]
    base = ExtractOptions(topk=100).to_attrs()
    f16 = estimate_image_bytes(levels, (640, 640), 256, base)
    assert f16["feat/b4"] == 256 * 160 * 160 * 2 and f16["feat/e8"] == 256 * 80 * 80 * 2
    q = estimate_image_bytes(levels, (640, 640), 256, {**base, "quant": "int8"})
    assert q["feat/b4"] == 256 * 160 * 160 and q["qparams/b4"] == 256 * 8
    # what the estimate says of a real cache is an upper bound of its arrays (lossless float16)
    res = _extract(root, images, ann, "est")
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(MfdetrError, match=r"GB free.*--force") as e:
        _extract(root, images, ann, "nofit")
    assert "estimated" in str(e.value)
    ok = fake_extract(images, ann, root / "forced.zarr", ExtractOptions(topk=TOPK, block=BLOCK), force=True)
    assert ok.images_done == N and math.isfinite(res.timings["total"])
