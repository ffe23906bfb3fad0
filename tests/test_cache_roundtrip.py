"""Extract -> reader round trip, lossy options, reuse, fingerprint errors, info/verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from mfdetr.cache.inspect import cache_info, verify
from mfdetr.cache.reader import CacheDataset, open_cache
from mfdetr.cache.schema import ATTR_KEY, INCOMPLETE_KEY
from mfdetr.data.coco import CocoDataset
from mfdetr.errors import MfdetrError
from mfdetr.extract.loop import ExtractOptions, MatchOptions, extract
from mfdetr.extract.matching import compute_targets, unpack_masks
from tests.fake_detector import FakeDetector, make_small_synth
from tests.tiny_cache import assert_same_tree, extract_into, sample_gt

TOPK = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    images, ann = make_small_synth(root, n=10, size=96)
    ds = CocoDataset(ann, images)
    return images, ann, ds


def _det(ds, **kw):
    return FakeDetector(categories=ds.categories, topk=TOPK, **kw)


def _run(data, out, progress=False, **opt):
    images, ann, ds = data
    opts = ExtractOptions(topk=TOPK, block=4, **opt)
    return extract_into(_det(ds, levels=opts.levels), images, ann, out, opts, batch_size=3, progress=progress)


TOL = {"float32": 0.0, "float16": 2**-11, "bfloat16": 2**-8}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(data, tmp_path, dtype):
    images, ann, ds = data
    res = _run(data, tmp_path / "c.zarr", dtype=dtype, levels=["f4", "f16"])
    assert res.images_done == res.images_written == len(ds) and not res.reused
    cache = CacheDataset(res.path)
    assert len(cache) == len(ds) and cache.fingerprint == res.fingerprint
    assert [lv.name for lv in cache.levels] == ["f4", "f16"] and cache.query_dim == 16
    assert cache.topk == TOPK and cache.mask_size == 64
    det = _det(ds, levels=["f4", "f16"])
    rtol = TOL[dtype]
    for j in range(len(ds)):
        s = ds[j]
        o = det.detect([s.image])[0]
        r = cache[j]
        n = o.boxes.shape[0]
        assert r["index"] == j and r["image_id"] == s.image_id and r["num_boxes"] == n
        assert r["orig_size"] == o.orig_size and r["input_size"] == o.input_size
        assert r["scale"] == pytest.approx(o.scale)
        assert torch.equal(r["boxes"][:n], o.boxes) and not r["boxes"][n:].any()
        assert torch.equal(r["scores"][:n], o.scores)
        assert torch.equal(r["labels"][:n], o.labels) and (r["labels"][n:] == -1).all()
        for name, f in o.features.items():
            g = r["features"][name]
            assert g.shape == f.shape and g.dtype == torch.float32
            assert torch.allclose(g, f, rtol=rtol, atol=1e-6 if rtol else 0), name
        assert torch.allclose(r["queries"][:n], o.queries, rtol=rtol, atol=1e-6 if rtol else 0)
        # targets equal a direct computation from the annotations
        gt = sample_gt(s)
        t = compute_targets(r["boxes"], r["labels"], r["scores"], n, gt, "iou", 0.5, 64)
        assert np.array_equal(r["match_ann_id"].numpy(), t["match_ann_id"])
        assert np.array_equal(r["match_iou"].numpy(), t["match_iou"])
        assert np.array_equal(r["mask_targets"].numpy(), unpack_masks(t["mask_targets"], 64))
    batch = cache.collate([cache[0], cache[1]])
    assert batch["features"]["f4"].shape[0] == 2 and batch["mask_targets"].shape == (2, TOPK, 64, 64)
    assert (batch["match_ann_id"] >= 0).any()
    assert verify(res.path) == []


@pytest.mark.parametrize("dtype,keepbits", [("float16", 5), ("bfloat16", 3), ("float32", 10)])
def test_keepbits_bounds_the_error(data, tmp_path, dtype, keepbits):
    res = _run(data, tmp_path / "c.zarr", dtype=dtype, keepbits=keepbits)
    lossless = CacheDataset(_run(data, tmp_path / "l.zarr", dtype="float32").path)
    cache = CacheDataset(res.path)
    for j in range(3):
        for name, f in lossless[j]["features"].items():
            g = cache[j]["features"][name]
            rel = ((g - f).abs() / f.abs().clamp(min=1e-3)).max().item()
            # BitRound: half a unit in the last kept bit; plus the storage dtype's own rounding
            assert rel <= 2.0 ** -(keepbits + 1) + TOL[dtype] * 1.01, (name, rel)


def test_reuse_and_cache_root(data, tmp_path, capsys):
    images, ann, ds = data
    opts = ExtractOptions(topk=TOPK, block=4)
    r1 = extract(_det(ds), images, ann, cache_root=tmp_path / "root", opts=opts, workers=0, progress=False)
    name = Path(r1.path).name
    assert Path(r1.path).parent == tmp_path / "root"
    assert name.startswith("build-train-") and name.endswith(f"{r1.fingerprint[:12]}.zarr")
    stamp = {p: p.stat().st_mtime_ns for p in Path(r1.path).rglob("*") if p.is_file()}
    r2 = extract(_det(ds), images, ann, cache_root=tmp_path / "root", opts=opts, workers=0, progress=False)
    assert r2.reused and r2.images_written == 0 and r2.path == r1.path and r2.images_done == len(ds)
    assert stamp == {p: p.stat().st_mtime_ns for p in Path(r1.path).rglob("*") if p.is_file()}
    # other options -> another store next to it
    r3 = extract(
        _det(ds),
        images,
        ann,
        cache_root=tmp_path / "root",
        opts=ExtractOptions(topk=TOPK, block=4, match=MatchOptions(rule="hungarian")),
        workers=0,
        progress=False,
    )
    assert r3.path != r1.path and not r3.reused
    # the CLI says so
    from typer.testing import CliRunner

    from mfdetr.cli import app

    out = CliRunner().invoke(
        app,
        [
            "extract",
            "--detector",
            "py:tests.fake_detector:build",
            "--images",
            str(images),
            "--annotations",
            str(ann),
            "--cache-root",
            str(tmp_path / "root"),
            "--topk",
            str(TOPK),
            "--block",
            "4",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "nothing to do" in out.output and name in out.output


def test_fingerprint_mismatch_is_a_clear_error(data, tmp_path):
    out = tmp_path / "c.zarr"
    _run(data, out, dtype="float16")
    with pytest.raises(MfdetrError, match=r"another cache.*options\.dtype 'float16' vs 'bfloat16'"):
        _run(data, out, dtype="bfloat16")
    # a directory that is not a store, and a Zarr group that is not an mfdetr cache
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(MfdetrError, match="not a Zarr store"):
        _run(data, junk)
    # a concurrent job caught mid-write of the root zarr.json (Zarr writes a temp file, then renames it):
    # the directory is not someone else's, and creation goes on
    racing = tmp_path / "racing.zarr"
    racing.mkdir()
    (racing / "zarr.0123abcd.partial").write_bytes(b"{")
    _run(data, racing)
    made = open_cache(racing).attrs
    assert INCOMPLETE_KEY not in made  # finished, not left half-created
    assert made[ATTR_KEY]["dataset"] == open_cache(out).attrs[ATTR_KEY]["dataset"]
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_array("x", shape=(2,), dtype="int32")
    with pytest.raises(MfdetrError, match="not an mfdetr cache"):
        _run(data, tmp_path / "plain.zarr")
    with pytest.raises(MfdetrError, match="not an mfdetr cache"):
        open_cache(tmp_path / "plain.zarr")
    with pytest.raises(MfdetrError, match="no cache at"):
        CacheDataset(tmp_path / "nothing.zarr")


def test_options_validation():
    for bad in (
        dict(keepbits=11),
        dict(keepbits=8, dtype="bfloat16"),
        dict(mask_size=60),
        dict(block=0),
        dict(codec="gzip"),
        dict(levels=[]),
    ):
        with pytest.raises(MfdetrError):
            ExtractOptions(**bad).validate()
    from mfdetr.utils.config import from_dict

    o = from_dict(ExtractOptions, {"topk": 50, "dtype": "bfloat16", "match": {"rule": "hungarian"}})
    assert o.topk == 50 and o.match.rule == "hungarian" and o.match.iou_threshold == 0.5


def test_info_and_verify(data, tmp_path):
    res = _run(data, tmp_path / "c.zarr", codec="lz4")
    info = cache_info(res.path)
    assert info["images_done"] == info["images_total"] == 10 and info["images_bad"] == 0
    assert info["bytes_on_disk"] > 0 and info["bytes_per_image"] == pytest.approx(info["bytes_on_disk"] / 10)
    assert 0 < info["ratio_to_raw_float32"] and info["options"]["codec"] == "lz4"
    assert [lv["name"] for lv in info["levels"]] == ["f8", "f16"] and info["bytes_by_array"]["feat/f8"] > 0
    from typer.testing import CliRunner

    from mfdetr.cli import app

    out = CliRunner().invoke(app, ["cache", "info", res.path])
    assert (
        out.exit_code == 0
        and "10/10 done" in out.output
        and "per image" in out.output
        and "lz4" in out.output
    )
    out = CliRunner().invoke(app, ["cache", "verify", res.path])
    assert out.exit_code == 0 and "ok" in out.output
    # corrupt one feature shard: verify names the images of that block
    shard = next(
        p
        for p in (Path(res.path) / "feat" / "f8").rglob("*")
        if p.is_file() and p.name == "0" and p.parent.parent.parent.name == "1"
    )
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 16] = b"\xff" * 16
    shard.write_bytes(bytes(raw))
    problems = verify(res.path)
    assert problems and all("image position" in p for p in problems)
    assert {int(p.split()[2].rstrip(":")) for p in problems} <= {4, 5, 6, 7} and any(
        "decode" in p for p in problems
    )
    out = CliRunner().invoke(app, ["cache", "verify", res.path])
    assert out.exit_code == 1 and "problem" in out.output


def test_dataloader_workers_read_the_same(data, tmp_path):
    res = _run(data, tmp_path / "c.zarr")
    cache = CacheDataset(res.path)
    loader = torch.utils.data.DataLoader(cache, batch_size=4, num_workers=2, collate_fn=cache.collate)
    batches = list(loader)
    assert sum(b["image_id"].shape[0] for b in batches) == len(cache)
    ref = cache.collate([cache[j] for j in range(4)])
    assert torch.equal(batches[0]["features"]["f8"], ref["features"]["f8"])
    assert torch.equal(batches[0]["mask_targets"], ref["mask_targets"])
    no_t = CacheDataset(res.path, load_targets=False)[0]
    assert "mask_targets" not in no_t and "boxes" in no_t


def test_float16_underflow_is_reported(data, tmp_path):
    images, ann, ds = data
    opts = ExtractOptions(topk=TOPK, block=4, dtype="float16")
    res = extract_into(_det(ds, feature_scale=1e-9), images, ann, tmp_path / "a.zarr", opts)
    assert len(res.warnings) == 2 and all("below float16's normal range" in w for w in res.warnings)
    assert any("level f8" in w for w in res.warnings) and "bfloat16" in res.warnings[0]
    bf16 = ExtractOptions(topk=TOPK, block=4, dtype="bfloat16")
    ok = extract_into(_det(ds, feature_scale=1e-9), images, ann, tmp_path / "b.zarr", bf16)
    assert ok.warnings == []
    r = CacheDataset(ok.path)[0]["features"]["f8"]
    assert r.abs().max() > 0 and r.abs().max() < 1e-8  # bfloat16 keeps the tiny values
    assert _run(data, tmp_path / "c.zarr").warnings == []


def test_fsspec_url_store(data):
    images, ann, ds = data
    opts = ExtractOptions(topk=TOPK, block=4)
    r = extract(
        _det(ds), images, ann, cache_root="memory://mfdetr-test-caches", opts=opts, workers=0, progress=False
    )
    assert r.path.startswith("memory://mfdetr-test-caches/build-train-") and r.images_done == len(ds)
    cache = CacheDataset(r.path)
    assert len(cache) == len(ds) and cache[3]["image_id"] == ds.image_ids[3]
    assert verify(r.path) == [] and cache_info(r.path)["bytes_on_disk"] > 0
    assert extract(
        _det(ds), images, ann, cache_root="memory://mfdetr-test-caches", opts=opts, workers=0, progress=False
    ).reused


@pytest.mark.parametrize("writers", [0, 2])
def test_writer_modes_give_the_same_bytes_and_report_errors(data, tmp_path, writers):
    images, ann, ds = data
    opts = ExtractOptions(topk=TOPK, block=2)
    ref = extract_into(_det(ds), images, ann, tmp_path / "ref.zarr", opts, writers=1)
    res = extract_into(_det(ds), images, ann, tmp_path / "w.zarr", opts, writers=writers)
    assert res.images_written == len(ds) and res.timings["write"] > 0
    # writer processes report their start-up CPU (store open, imports) apart from the per-image CPU
    assert ref.timings["writer_start_cpu"] > 0 and ref.timings["write_cpu"] > 0
    assert ("writer_start_cpu" in res.timings) == (writers > 0)
    assert_same_tree(ref.path, res.path)

    class Broken(FakeDetector):
        def detect(self, images):
            outs = super().detect(images)
            for o in outs:
                o.queries = o.queries[:, :3]  # not query_dim wide
            return outs

    with pytest.raises(MfdetrError, match="queries have shape"):
        extract_into(
            Broken(categories=ds.categories, topk=TOPK),
            images,
            ann,
            tmp_path / "x.zarr",
            opts,
            writers=writers,
        )


def test_auto_block(data, tmp_path):
    from mfdetr.cache.schema import auto_block

    small = [{"name": "a", "stride": 8, "channels": 8}]
    assert auto_block(small, {"a": [12, 12]}, 100, 16, "float16") == 64
    r50 = [
        {"name": n, "stride": s, "channels": 256} for n, s in (("b4", 4), ("e8", 8), ("e16", 16), ("e32", 32))
    ]
    padded = {"b4": [160, 160], "e8": [80, 80], "e16": [40, 40], "e32": [20, 20]}
    assert auto_block(r50, padded, 300, 256, "float16") == 8  # ~17 MB/image: the minimum
    mid = [{"name": "e8", "stride": 8, "channels": 256}]
    assert auto_block(mid, {"e8": [40, 40]}, 100, 256, "float16") == 32  # ~0.87 MB/image
    assert auto_block(mid, {"e8": [40, 40]}, 100, 256, "float32") == 16
    images, ann, ds = data
    res = extract_into(_det(ds), images, ann, tmp_path / "c.zarr", ExtractOptions(topk=TOPK))
    assert CacheDataset(res.path).attrs["options"]["block"] == 64
