"""Scale-out: two concurrent `--shard i/n` jobs, and torchrun ranks, fill a cache equal to one process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mfdetr.errors import MfdetrError
from mfdetr.extract.loop import ExtractOptions, parse_shard
from tests.fake_detector import REPO_ROOT, make_small_synth, subprocess_env, tree_bytes
from tests.tiny_cache import assert_same_tree, extract_args, fake_extract, python_m_mfdetr

N, BLOCK, TOPK = 12, 2, 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    images, ann = make_small_synth(root / "data", n=N, size=96, seed=4)
    ref = fake_extract(images, ann, root / "ref.zarr", ExtractOptions(topk=TOPK, block=BLOCK))
    return root, images, ann, ref


def _args(images, ann, out):
    return extract_args(images, ann, out, topk=TOPK, block=BLOCK)


def test_parse_shard():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(MfdetrError):
            parse_shard(bad)


def test_two_concurrent_shard_jobs_equal_one_process(setup):
    root, images, ann, ref = setup
    out = root / "sharded.zarr"
    procs = [
        subprocess.Popen(
            python_m_mfdetr([*_args(images, ann, out), "--shard", f"{i}/2"]),
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert_same_tree(ref.path, out)
    a = tree_bytes(ref.path)
    # in-process shards too (and a shard whose blocks are all done does nothing)
    out2 = root / "sharded2.zarr"
    for i in (1, 0):
        r = fake_extract(images, ann, out2, ExtractOptions(topk=TOPK, block=BLOCK), shard=(i, 2))
        assert r.images_written == N // 2
    assert fake_extract(images, ann, out2, ExtractOptions(topk=TOPK, block=BLOCK), shard=(0, 2)).reused
    a2 = tree_bytes(out2)
    assert [k for k in a if a[k] != a2.get(k)] == []


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun"
)
def test_torchrun_ranks_equal_one_process(setup):
    root, images, ann, ref = setup
    out = root / "torchrun.zarr"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    p = subprocess.Popen(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mfdetr", *_args(images, ann, out)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        log = p.communicate(timeout=240)[0].decode()
    finally:
        if p.poll() is None:  # torchrun and its ranks share the new session's process group
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, log
    assert "rank 0 of 2" in log
    assert_same_tree(ref.path, out)


@pytest.mark.filterwarnings("ignore::UserWarning")  # warnings.catch_warnings is not thread-safe
def test_concurrent_creation_never_fails_or_loses_metadata(setup, tmp_path):
    import threading

    from mfdetr.cache.reader import open_cache
    from mfdetr.cache.schema import ATTR_KEY, array_specs
    from mfdetr.cache.writer import create_or_open
    from mfdetr.data.coco import CocoDataset
    from mfdetr.extract.loop import build_meta
    from tests.fake_detector import FakeDetector

    root, images, ann, ref = setup
    ds = CocoDataset(ann, images)
    meta = build_meta(
        FakeDetector(categories=ds.categories, topk=TOPK),
        ds,
        images,
        ann,
        ExtractOptions(topk=TOPK, block=BLOCK),
    )
    for trial in range(4):
        path = str(tmp_path / f"race{trial}.zarr")
        start = threading.Barrier(6)
        errors = []

        def go(start=start, path=path, errors=errors):
            start.wait()
            try:
                create_or_open(path, meta, create=True)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=go) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        g = open_cache(path)
        assert g.attrs[ATTR_KEY]["fingerprint"] == meta["fingerprint"] and "mfdetr_incomplete" not in g.attrs
        assert all(tuple(g[s.name].shape) == s.shape for s in array_specs(meta))
