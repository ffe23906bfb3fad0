"""Reading a cache over plain HTTP (no directory listing): what a remote experiment does."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from mfdetr.cache.inspect import cache_info, verify
from mfdetr.cache.reader import CacheDataset
from mfdetr.extract import ExtractOptions
from tests.fake_detector import FakeDetector, make_small_synth, serve_http
from tests.tiny_cache import extract_into


def _www_cache(tmp_path: Path, n: int, seed: int, **opt):
    """A tiny fake-detector cache at ``tmp_path/www/c.zarr`` (the folder a server shares); returns
    (images, annotations, the extract result)."""
    from mfdetr.data.coco import CocoDataset

    images, ann = make_small_synth(tmp_path / "data", n=n, size=96, seed=seed)
    det = FakeDetector(categories=CocoDataset(ann, images).categories, topk=8)
    res = extract_into(det, images, ann, tmp_path / "www" / "c.zarr", ExtractOptions(topk=8, block=4, **opt))
    return images, ann, res


def test_read_over_http_equals_local(tmp_path):
    _, _, res = _www_cache(tmp_path, 6, 5, dtype="bfloat16")
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


@contextlib.contextmanager
def python_http_server(root: Path):
    """``python -m http.server`` (which ignores Range requests) serving ``root``; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_trains_and_evaluates_from_a_python_http_server_url(tmp_path, caplog):
    """A cache served read-only by ``python -m http.server`` (no Range support: whole shard files come
    back and are sliced locally) trains exactly as from the local path, and evaluates from its URL."""
    from mfdetr.evaluate import EvalConfig, evaluate
    from mfdetr.train.loop import train_from_cache
    from tests.tiny_train import small_train

    _, ann, res = _www_cache(tmp_path, 8, 7, mask_size=16)
    cfg = dict(epochs=1, batch_size=4, seed=3, workers=1)
    local = train_from_cache(res.path, tmp_path / "run_local", small_train(**cfg), progress=False)
    eval_cfg = EvalConfig(workers=0, progress=False)
    with python_http_server(tmp_path / "www") as base:
        url = f"{base}/c.zarr"
        remote = train_from_cache(
            url, tmp_path / "run_remote", small_train(**cfg), val_cache=url, progress=False
        )
        assert remote.steps == local.steps == 2
        assert remote.train_loss == local.train_loss
        assert 0.0 <= remote.val_miou <= 1.0
        ev = evaluate(url, Path(remote.checkpoint), eval_cfg, annotations=ann, out=tmp_path / "eval")
    ev_local = evaluate(
        res.path, Path(local.checkpoint), eval_cfg, annotations=ann, out=tmp_path / "eval_local"
    )
    assert ev.num_images == 8
    assert any("ignores HTTP Range" in r.getMessage() for r in caplog.records)  # the fallback was exercised
    assert ev.mask_ap == ev_local.mask_ap and ev.box_ap == ev_local.box_ap
    sa = torch.load(remote.checkpoint, map_location="cpu", weights_only=False)["model"]
    sb = torch.load(local.checkpoint, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
