"""Shared steps of the cache / extract tests: extract a tiny synth split with the fake detector (in this
process or as a ``python -m mfdetr extract`` child), kill a child mid-run, compare two stores' bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mfdetr.extract.loop import ExtractResult, extract
from tests.fake_detector import REPO_ROOT, SPEC, subprocess_env, tree_bytes


def extract_into(detector: Any, images: Any, ann: Any, out: Any, opts: Any, **kw: Any) -> ExtractResult:
    """``extract`` with ``detector`` (a spec or an object) into ``out``, in this process: no DataLoader
    workers, no progress bar unless ``kw`` says otherwise (any other ``extract`` keyword passes through)."""
    kw = {"workers": 0, "progress": False, **kw}
    return extract(detector, images, ann, out=str(out), opts=opts, **kw)


def fake_extract(images: Any, ann: Any, out: Any, opts: Any, **kw: Any) -> ExtractResult:
    """``extract_into`` with the fake detector's spec and batches of 2 unless ``kw`` says otherwise."""
    return extract_into(SPEC, images, ann, out, opts, **{"batch_size": 2, **kw})


def sample_gt(s: Any) -> dict[str, Any]:
    """The ground-truth dict ``compute_targets`` takes, from a ``CocoDataset`` sample."""
    return {
        "boxes": s.boxes,
        "labels": s.labels,
        "iscrowd": s.iscrowd,
        "ann_ids": s.ann_ids,
        "masks": s.masks,
        "orig_size": tuple(s.image.shape[1:]),
    }


def extract_args(
    images: Any,
    ann: Any,
    out: Any,
    *,
    topk: int,
    block: int,
    batch_size: int = 2,
    workers: int = 0,
    writers: int | None = None,
    extra: tuple[str, ...] | list[str] = (),
    detector: str = SPEC,
) -> list[str]:
    """The ``mfdetr extract`` argument list (no program name), by default for the fake detector."""
    args = ["extract", "--detector", detector, "--images", str(images), "--annotations", str(ann)]
    args += ["--out", str(out), "--topk", str(topk), "--block", str(block)]
    args += ["--batch-size", str(batch_size), "--workers", str(workers)]
    if writers is not None:
        args += ["--writers", str(writers)]
    return [*args, "--no-progress", *extra]


def python_m_mfdetr(args: list[str]) -> list[str]:
    """A ``python -m mfdetr ARGS`` command line for this interpreter."""
    return [sys.executable, "-m", "mfdetr", *args]


def extract_cmd(images: Any, ann: Any, out: Any, **kw: Any) -> list[str]:
    """``python -m mfdetr`` + ``extract_args(images, ann, out, **kw)``."""
    return python_m_mfdetr(extract_args(images, ann, out, **kw))


def done_mask(out: Any, n: int) -> np.ndarray:
    """The store's ``done`` flags (all False while the store does not exist yet or cannot be read)."""
    try:
        return np.asarray(zarr.open_group(str(out), mode="r")["done"][:], bool)
    except Exception:
        return np.zeros(n, bool)


def kill_mid_run(cmd: list[str], out: Any, n: int, *, min_done: int, sleep: str, settle: float) -> None:
    """Start ``cmd`` (an extract into ``out`` with the fake detector slowed by ``sleep`` s per image),
    wait until ``min_done`` images are done, ``settle`` s more, then SIGKILL it; it must still be running."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=subprocess_env(MFDETR_FAKE_SLEEP=sleep),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and done_mask(out, n).sum() < min_done and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(settle)  # now somewhere inside a later block: detector, matching or a Zarr write
        assert proc.poll() is None, (
            "the extract finished before it could be killed: " + proc.stdout.read().decode()
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_same_tree(a_path: Path | str, b_path: Path | str) -> None:
    """The two stores hold the same files with the same bytes."""
    a, b = tree_bytes(a_path), tree_bytes(b_path)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
