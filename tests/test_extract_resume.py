"""SIGKILL at an arbitrary moment, then resume: the store ends byte-equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from mfdetr.cache.reader import CacheDataset
from mfdetr.extract.loop import ExtractOptions, extract
from tests.fake_detector import REPO_ROOT, SPEC, make_small_synth, subprocess_env, tree_bytes

N, BLOCK, TOPK, BATCH = 16, 2, 10, 2


def _cli(images, ann, out):
    return [sys.executable, "-m", "mfdetr", "extract", "--detector", SPEC, "--images", str(images), "--annotations",
            str(ann), "--out", str(out), "--topk", str(TOPK), "--block", str(BLOCK), "--batch-size", str(BATCH),
            "--workers", "1", "--writers", "1", "--no-progress"]


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


def _done(out: Path) -> np.ndarray:
    try:
        return np.asarray(zarr.open_group(str(out), mode="r")["done"][:], bool)
    except Exception:
        return np.zeros(N, bool)


def test_sigkill_then_resume_gives_the_same_bytes(tmp_path):
    images, ann = make_small_synth(tmp_path / "data", n=N, size=96, seed=2)
    opts = ExtractOptions(topk=TOPK, block=BLOCK)
    ref = extract(SPEC, images, ann, out=str(tmp_path / "ref.zarr"), opts=opts, batch_size=BATCH, workers=0,
                  progress=False)
    assert ref.images_done == N

    out = tmp_path / "killed.zarr"
    # slow detector: ~0.25 s per image, so the run takes ~4 s after start-up
    proc = subprocess.Popen(_cli(images, ann, out), cwd=REPO_ROOT, env=subprocess_env(MFDETR_FAKE_SLEEP="0.25"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and _done(out).sum() < 2 * BLOCK and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # now somewhere inside a later block: detector, matching or a Zarr write
        assert proc.poll() is None, "the extract finished before it could be killed: " + proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # no orphan (DataLoader worker, writer process) outlives the killed extract
    deadline = time.time() + 10
    while _procs_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert _procs_mentioning(str(out)) == []
    done = _done(out)
    assert 2 * BLOCK <= done.sum() < N
    # blocks are all-or-nothing, and a reader sees exactly the done images
    assert all(done[b * BLOCK:(b + 1) * BLOCK].all() or not done[b * BLOCK:(b + 1) * BLOCK].any()
               for b in range(N // BLOCK))
    partial = CacheDataset(out)
    assert list(partial.positions) == list(np.flatnonzero(done))
    assert partial[0]["image_id"] == CacheDataset(ref.path)[0]["image_id"]

    res = extract(SPEC, images, ann, out=str(out), opts=opts, batch_size=BATCH, workers=0, progress=False)
    assert not res.reused and res.images_written == N - done.sum() and res.images_done == N
    assert res.fingerprint == ref.fingerprint
    a, b = tree_bytes(ref.path), tree_bytes(out)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_interrupted_creation_is_completed(tmp_path, monkeypatch):
    import mfdetr.cache.writer as w
    from mfdetr.errors import MfdetrError

    images, ann = make_small_synth(tmp_path / "data", n=4, size=96, seed=3)
    opts = ExtractOptions(topk=TOPK, block=BLOCK)
    ref = extract(SPEC, images, ann, out=str(tmp_path / "ref.zarr"), opts=opts, batch_size=BATCH, workers=0,
                  progress=False)
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
        extract(SPEC, images, ann, out=str(out), opts=opts, batch_size=BATCH, workers=0, progress=False)
    monkeypatch.setattr(w, "_create_array", real)
    with pytest.raises(MfdetrError, match="not an mfdetr cache"):
        CacheDataset(out)  # half-created: readers refuse it
    with pytest.raises(MfdetrError, match="interrupted creation of another cache"):
        extract(SPEC, images, ann, out=str(out), opts=ExtractOptions(topk=TOPK + 1, block=BLOCK), batch_size=BATCH,
                workers=0, progress=False)
    res = extract(SPEC, images, ann, out=str(out), opts=opts, batch_size=BATCH, workers=0, progress=False)
    assert res.images_done == 4
    a, b = tree_bytes(ref.path), tree_bytes(out)
    assert [k for k in a if a[k] != b.get(k)] == [] and sorted(a) == sorted(b)
