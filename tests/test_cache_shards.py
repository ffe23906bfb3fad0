"""The writer's own shard objects (``mfdetr/cache/shards.py``) against Zarr's sharded write: the same
values read back, and the same bytes, for every codec and storage dtype of the cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from zarr.core.sync import sync

from mfdetr.cache.codecs import create_spec_array
from mfdetr.cache.schema import ArraySpec, quiet_zarr
from mfdetr.cache.shards import ShardEncoder
from mfdetr.extract.loop import ExtractOptions
from tests.fake_detector import make_small_synth
from tests.tiny_cache import assert_same_tree, fake_extract

N, BLOCK = 7, 3  # three shards, the last one partial (one image)


def _data(dtype: str, tail: tuple[int, ...], fill: float, rng: np.random.Generator) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal((N, *tail)).astype(dtype)
    else:
        x = rng.integers(0, 60000 if dtype == "uint16" else 200, (N, *tail)).astype(dtype)
    x[1] = fill  # an image holding only the fill value (an empty inner chunk)
    x[3:6] = fill  # a whole block of fill (no object at all, unless empty chunks are written)
    x[6, ..., : tail[-1] // 2] = fill  # the last, partial shard partly fill
    return x


def _write_ours(arr: zarr.Array, enc: ShardEncoder, data: np.ndarray) -> None:
    for b, s in enumerate(range(0, N, BLOCK)):
        chunks = [sync(enc.encode(enc.chunk(data[i]))) for i in range(s, min(N, s + BLOCK))]
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((b,) + (0,) * (data.ndim - 1))}"
        sync(enc.write(arr.store, key, chunks))


def _objects(path, name: str) -> dict[str, bytes]:
    root = path / name
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CASES = [
    # codec, stored dtype, keepbits, fill (features are float16 / uint16 = bfloat16 / uint8 = int8 codes)
    ("blosc-zstd", "float16", None, 0),
    ("blosc-zstd", "uint16", None, 0),
    ("blosc-zstd", "uint8", None, 0),
    ("blosc-zstd", "float16", 5, 0),
    ("blosc-zstd", "float32", 9, 0),
    ("blosc-zstd", "int64", None, -1),
    ("zstd", "float16", None, 0),
    ("zstd", "uint16", None, 0),
    ("zstd", "uint8", None, 0),
    ("zstd", "float32", None, 0),
    ("lz4", "float16", None, 0),
    ("none", "float16", None, 0),
    ("none", "int64", None, -1),
]


@pytest.mark.parametrize("write_empty", [True, False])
@pytest.mark.parametrize(("codec", "dtype", "keepbits", "fill"), CASES)
@quiet_zarr()
def test_own_shards_equal_zarrs(tmp_path, codec, dtype, keepbits, fill, write_empty):
    tail = (3, 5, 6)
    spec = ArraySpec("a", (N, *tail), dtype, (1, *tail), (BLOCK, *tail), fill, keepbits is not None)
    opts = {"codec": codec, "codec_level": None, "keepbits": keepbits, "dtype": "float16"}
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name in ("ours", "zarrs"):
        assert create_spec_array(g, dataclasses.replace(spec, name=name), opts)
    data = _data(dtype, tail, fill, np.random.default_rng(3))
    zarrs = g["zarrs"].with_config({"write_empty_chunks": write_empty})
    zarrs[:] = data
    ours = g["ours"]
    enc = ShardEncoder.for_array(ours, write_empty)
    assert enc is not None
    _write_ours(ours, enc, data)
    back = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    expect = back["zarrs"][:]
    assert np.array_equal(back["ours"][:], expect)
    if keepbits is None:
        assert np.array_equal(expect, data)  # lossless: both hold exactly the data
    a, b = _objects(tmp_path / "g.zarr", "ours"), _objects(tmp_path / "g.zarr", "zarrs")
    assert sorted(a) == sorted(b)  # same objects (no shard where a block holds only fill values)
    assert [k for k in a if k != "zarr.json" and a[k] != b[k]] == []  # and the same bytes
    assert ("c/1/0/0/0" in a) == write_empty


@pytest.mark.filterwarnings("ignore:Combining a `sharding_indexed`")
@quiet_zarr()
def test_index_at_the_start_and_other_layouts(tmp_path):
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    data = np.arange(N * 8, dtype="float32").reshape(N, 2, 4)
    sharding = ShardingCodec(
        chunk_shape=(1, 2, 4), codecs=[BytesCodec(), ZstdCodec(), Crc32cCodec()], index_location="start"
    )
    kw = {
        "shape": data.shape,
        "dtype": "float32",
        "chunks": (BLOCK, 2, 4),
        "serializer": sharding,
        "compressors": None,
    }
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    ours, zarrs = g.create_array("ours", **kw), g.create_array("zarrs", **kw)
    zarrs[:] = data
    _write_ours(ours, ShardEncoder.for_array(ours, False), data)
    assert np.array_equal(g["ours"][:], data)
    assert (
        _objects(tmp_path / "g.zarr", "ours")["c/0/0/0"] == _objects(tmp_path / "g.zarr", "zarrs")["c/0/0/0"]
    )
    # layouts other than one image per inner chunk of a one-block shard: left to Zarr
    other = g.create_array("two", shape=(N, 4), dtype="int32", chunks=(2, 4), shards=(4, 4))
    plain = g.create_array("plain", shape=(N, 4), dtype="int32", chunks=(2, 4))
    assert ShardEncoder.for_array(other, True) is None and ShardEncoder.for_array(plain, True) is None


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_small_synth(tmp_path_factory.mktemp("shards") / "data", n=N, size=64, seed=5)


@pytest.mark.parametrize(
    "opts",
    [
        ExtractOptions(topk=5, block=BLOCK),
        ExtractOptions(topk=5, block=BLOCK, dtype="bfloat16", codec="zstd"),
        ExtractOptions(topk=5, block=BLOCK, quant="int8", keepbits=None),
        ExtractOptions(topk=5, block=BLOCK, keepbits=6, codec="lz4"),
    ],
    ids=["default", "bfloat16-zstd", "int8", "keepbits-lz4"],
)
def test_extract_stores_the_bytes_zarr_would(synth, tmp_path, monkeypatch, opts):
    images, ann = synth
    shards = []
    assemble = ShardEncoder.assemble

    async def counted(self, chunks):
        shards.append(self.name)
        return await assemble(self, chunks)

    with monkeypatch.context() as m:  # a writer thread of this process: the patches reach it
        m.setattr(ShardEncoder, "assemble", counted)
        fake_extract(images, ann, tmp_path / "ours.zarr", opts, writers=0)
    assert {"feat/f8", "boxes", "mask_targets"} <= set(shards)  # the sharded arrays went our way
    with monkeypatch.context() as m:  # Zarr's own sharded writes, for every array
        m.setattr(ShardEncoder, "for_array", classmethod(lambda cls, array, write_empty: None))
        fake_extract(images, ann, tmp_path / "zarrs.zarr", opts, writers=0)
    assert_same_tree(tmp_path / "ours.zarr", tmp_path / "zarrs.zarr")
