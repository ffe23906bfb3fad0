"""Training results do not depend on the machine's load: the RoIAlign thread split is a function of the
configured thread count only (the load-adaptive split is an opt-in)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mfdetr.detectors.base import LevelSpec
from mfdetr.model.checkpoint import read_checkpoint
from mfdetr.ops import parallel
from mfdetr.train.loop import train_from_cache
from tests.synth_batches import LEVELS, SyntheticCache
from tests.tiny_train import small_net, small_train

BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


def test_thread_split_ignores_the_load_unless_asked(monkeypatch):
    monkeypatch.setattr(parallel.os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(parallel, "DYNAMIC_THREADS", False)
        assert parallel.n_workers(torch.device("cpu")) == 2
        monkeypatch.setattr(parallel, "DYNAMIC_THREADS", True)  # MFDETR_ADAPTIVE_THREADS=1
        assert parallel.n_workers(torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(prev)
    assert parallel.DYNAMIC_THREADS is not None
    out = subprocess.run(
        [sys.executable, "-c", "from mfdetr.ops import parallel; print(parallel.DYNAMIC_THREADS)"],
        capture_output=True,
        text=True,
        env={"MFDETR_ADAPTIVE_THREADS": "1", "PATH": ""},
        timeout=120,
    )
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.parametrize("pixels", [False, True], ids=["plain", "pixel-refine"])
def test_same_training_beside_busy_processes_is_bitwise_equal(tmp_path, monkeypatch, pixels):
    if pixels:  # a pixel level and the pixel refinement (its point sampling, patches, colours)
        ds = SyntheticCache(8, levels=LEVELS + [LevelSpec("px1", 1, 3)])
        cfg = small_train(epochs=1, threads=2, model=small_net(pixel_refine=16, refine_points=32))
    else:
        ds = SyntheticCache(8)
        cfg = small_train(epochs=1, threads=2)
    monkeypatch.setattr(parallel.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine (shared here)
    quiet = train_from_cache(ds, tmp_path / "quiet", cfg, progress=False)
    # busy processes, and the load average a machine shows after minutes of them (a 1-minute mean)
    monkeypatch.setattr(parallel.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(3)]
    try:
        loaded = train_from_cache(ds, tmp_path / "loaded", cfg, progress=False)
    finally:
        for p in busy:
            p.kill()
            p.wait(timeout=30)
    assert loaded.losses == quiet.losses
    wa = read_checkpoint(quiet.checkpoint)["model"]
    wb = read_checkpoint(loaded.checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
