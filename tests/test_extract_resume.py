"""SIGKILL at an arbitrary moment, then resume: the store ends byte-equal to an uninterrupted run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from mfdetr.cache.reader import CacheDataset
from mfdetr.extract.loop import ExtractOptions
from tests.fake_detector import make_small_synth
from tests.tiny_cache import assert_same_tree, done_mask, extract_cmd, fake_extract, kill_mid_run

N, BLOCK, TOPK, BATCH = 16, 2, 10, 2


def _cli(images, ann, out):
    return extract_cmd(images, ann, out, topk=TOPK, block=BLOCK, batch_size=BATCH, workers=1, writers=1)


def _procs_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_sigkill_then_resume_gives_the_same_bytes(tmp_path):
    images, ann = make_small_synth(tmp_path / "data", n=N, size=96, seed=2)
    opts = ExtractOptions(topk=TOPK, block=BLOCK)
    ref = fake_extract(images, ann, tmp_path / "ref.zarr", opts, batch_size=BATCH)
    assert ref.images_done == N

    out = tmp_path / "killed.zarr"
    # slow detector: ~0.25 s per image, so the run takes ~4 s after start-up
    kill_mid_run(_cli(images, ann, out), out, N, min_done=2 * BLOCK, sleep="0.25", settle=0.3)
    # no orphan (DataLoader worker, writer process) outlives the killed extract
    deadline = time.time() + 10
    while _procs_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert _procs_mentioning(str(out)) == []
    done = done_mask(out, N)
    assert 2 * BLOCK <= done.sum() < N
    # blocks are all-or-nothing, and a reader sees exactly the done images
    assert all(
        done[b * BLOCK : (b + 1) * BLOCK].all() or not done[b * BLOCK : (b + 1) * BLOCK].any()
        for b in range(N // BLOCK)
    )
    partial = CacheDataset(out)
    assert list(partial.positions) == list(np.flatnonzero(done))
    assert partial[0]["image_id"] == CacheDataset(ref.path)[0]["image_id"]

    res = fake_extract(images, ann, out, opts, batch_size=BATCH)
    assert not res.reused and res.images_written == N - done.sum() and res.images_done == N
    assert res.fingerprint == ref.fingerprint
    assert_same_tree(ref.path, out)


def test_interrupted_creation_is_completed(tmp_path, monkeypatch):
    import mfdetr.cache.writer as w
    from mfdetr.errors import MfdetrError

    images, ann = make_small_synth(tmp_path / "data", n=4, size=96, seed=3)
    opts = ExtractOptions(topk=TOPK, block=BLOCK)
    ref = fake_extract(images, ann, tmp_path / "ref.zarr", opts, batch_size=BATCH)
    real = w._create_array
    calls = []

    def dying(g, spec, o):
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill during creation")
        calls.append(spec.name)
        real(g, spec, o)

    monkeypatch.setattr(w, "_create_array", dying)
    out = tmp_path / "c.zarr"
    with pytest.raises(KeyboardInterrupt):
        fake_extract(images, ann, out, opts, batch_size=BATCH)
    monkeypatch.setattr(w, "_create_array", real)
    with pytest.raises(MfdetrError, match="not an mfdetr cache"):
        CacheDataset(out)  # half-created: readers refuse it
    with pytest.raises(MfdetrError, match="interrupted creation of another cache"):
        fake_extract(images, ann, out, ExtractOptions(topk=TOPK + 1, block=BLOCK), batch_size=BATCH)
    res = fake_extract(images, ann, out, opts, batch_size=BATCH)
    assert res.images_done == 4
    assert_same_tree(ref.path, out)
