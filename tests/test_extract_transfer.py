"""Storage conversion on the detector's device before the host copy (``extract/transfer.py``): the cache it
writes is byte-identical to the one the writers convert, and the torch BitRound is numcodecs' own."""

from __future__ import annotations

import functools

import numcodecs
import numpy as np
import pytest
import torch

import mfdetr.extract.loop as loop
from mfdetr.cache.floats import bitround, encode_float, to_storage
from mfdetr.data.coco import CocoDataset
from mfdetr.extract.loop import ExtractOptions
from mfdetr.extract.transfer import HostTransfer
from tests.fake_detector import FakeDetector, make_small_synth
from tests.tiny_cache import assert_same_tree, extract_into


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    images, ann = make_small_synth(tmp_path_factory.mktemp("synth"), n=7, size=96)
    return images, ann, CocoDataset(ann, images)


@pytest.mark.parametrize(
    "opt",
    [
        {"dtype": "float16"},
        {"dtype": "bfloat16", "keepbits": 4},
        {"dtype": "float16", "keepbits": 6},
        {"dtype": "float16", "quant": "int8"},  # levels stay float32 for the writers; queries converted
    ],
)
def test_device_conversion_writes_the_same_cache(data, tmp_path, monkeypatch, opt):
    images, ann, ds = data
    opts = ExtractOptions(topk=10, block=3, **opt)

    def run(out, convert):
        monkeypatch.setattr(loop, "HostTransfer", functools.partial(HostTransfer, convert=convert))
        det = FakeDetector(categories=ds.categories, topk=10)
        return extract_into(det, images, ann, out, opts, batch_size=2, progress=False)

    a = run(tmp_path / "writers.zarr", False)
    b = run(tmp_path / "device.zarr", True)
    assert a.fingerprint == b.fingerprint and a.images_written == b.images_written == len(ds)
    assert a.warnings == b.warnings
    assert_same_tree(a.path, b.path)


def test_float16_statistics_are_counted_where_the_conversion_happens():
    x = torch.tensor([0.0, 1e-6, 1e-9, 1.0, 7e4, -7e4])
    s1, s2 = {}, {}
    h = to_storage(x, "float16", None, s1)
    encode_float(x, "float16", None, s2)
    assert s1 == s2 == {"nonzero": 5, "below_normal": 2, "flushed": 1, "clamped": 2}
    assert to_storage(h, "float16", None, s3 := {}) is not None and s3 == {}  # converted before: not again
    assert h.dtype == torch.float16 and float(h[4]) == 65504.0


@pytest.mark.parametrize("keepbits", [1, 4, 7, 10, 23])
def test_bitround_matches_numcodecs(keepbits):
    g = torch.Generator().manual_seed(keepbits)
    x = torch.randn(20000, generator=g) * torch.logspace(-30, 30, 20000)
    x[:4] = torch.tensor([0.0, -0.0, float("inf"), -3.3e38])
    ref = numcodecs.BitRound(keepbits).encode(x.numpy().copy()).view(np.uint32)
    assert np.array_equal(bitround(x, keepbits).numpy().view(np.uint32), ref)
