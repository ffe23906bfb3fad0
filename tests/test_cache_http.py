"""Reading a cache over plain HTTP (no directory listing): what a remote experiment does."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mfdetr.cache.inspect import cache_info, verify
from mfdetr.cache.reader import CacheDataset
from mfdetr.engine.extract import ExtractOptions, extract

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.` importable
from tests.fake_detector import FakeDetector, make_small_synth, serve_http  # noqa: E402


def test_read_over_http_equals_local(tmp_path):
    images, ann = make_small_synth(tmp_path / "data", n=6, size=96, seed=5)
    from mfdetr.data.coco import CocoDataset

    ds = CocoDataset(ann, images)
    res = extract(FakeDetector(categories=ds.categories, topk=8), images, ann, out=str(tmp_path / "www" / "c.zarr"),
                  opts=ExtractOptions(topk=8, block=4, dtype="bfloat16"), workers=0, progress=False)
    local = CacheDataset(res.path)
    with serve_http(tmp_path / "www") as base:
        url = f"{base}/c.zarr"
        remote = CacheDataset(url)
        assert len(remote) == len(local) == 6 and remote.fingerprint == local.fingerprint
        for j in (0, 5, 2):
            a, b = local[j], remote[j]
            for k in ("boxes", "scores", "labels", "queries", "match_ann_id", "mask_targets"):
                assert torch.equal(a[k], b[k]), k
            assert all(torch.equal(a["features"][n], b["features"][n]) for n in a["features"])
        loader = torch.utils.data.DataLoader(remote, batch_size=3, num_workers=1, collate_fn=remote.collate)
        assert sum(len(b["image_id"]) for b in loader) == 6
        info = cache_info(url)
        assert info["images_done"] == 6 and info["bytes_on_disk"] is None
        assert verify(url) == []
