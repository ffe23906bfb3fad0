"""The one-owner helpers of issue 12 / 18: torchrun environment, device, progress bars, level dicts,
writable output directories and the disk-full message."""

from __future__ import annotations

import errno
import io
import sys

import pytest
import torch

from mfdetr.detectors.base import LevelSpec, level_dicts
from mfdetr.errors import MfdetrError
from mfdetr.utils.device import resolve_device
from mfdetr.utils.distributed import TorchrunEnv, torchrun_env
from mfdetr.utils.fs import disk_full_error, ensure_writable_dir, is_disk_full
from mfdetr.utils.progress import progress_bar


def test_torchrun_env_parsed_once():
    assert torchrun_env({}) == TorchrunEnv(0, 1, 0, 1, None) and not torchrun_env({}).launched
    env = torchrun_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
        }
    )
    assert (env.rank, env.world, env.local_rank, env.local_world) == (3, 4, 1, 2)
    assert env.master_addr == "127.0.0.1"
    assert env.launched
    assert torchrun_env({"WORLD_SIZE": "4"}).local_world == 4  # no LOCAL_WORLD_SIZE: one machine
    for bad in ({"WORLD_SIZE": "0"}, {"RANK": "x"}, {"LOCAL_RANK": "-1"}):
        with pytest.raises(MfdetrError, match=next(iter(bad))):
            torchrun_env(bad)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MfdetrError, match="'tpu9' is not a torch device"):
        resolve_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(MfdetrError, match="--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    with pytest.raises(MfdetrError, match="has 2 GPU"):
        resolve_device("cuda:2")


def test_progress_bar_off_unless_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a TTY: no bar lines in logs
    bar = progress_bar(total=3, desc="x")
    assert bar.disable
    bar.update(3)
    bar.close()
    assert "x" not in sys.stderr.getvalue()
    assert list(progress_bar([1, 2, 3], enabled=False)) == [1, 2, 3]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    bar = progress_bar(total=2, desc="shown", unit="it")
    assert not bar.disable  # (close() sets it)
    bar.update(2)
    bar.close()
    assert "shown" in sys.stderr.getvalue()
    assert progress_bar(total=1, enabled=False).disable


def test_level_dict_round_trip():
    levels = [LevelSpec("b4", 4, 32), LevelSpec("e8", 8, 256)]
    dicts = level_dicts(levels)
    assert dicts == [
        {"name": "b4", "stride": 4, "channels": 32},
        {"name": "e8", "stride": 8, "channels": 256},
    ]
    assert [LevelSpec.from_dict(d) for d in dicts] == levels
    assert LevelSpec.from_dict({"name": "x", "stride": "16", "channels": 8.0}) == LevelSpec("x", 16, 8)
    assert level_dicts(dicts) == dicts and level_dicts(None) == []


def test_ensure_writable_dir(tmp_path, monkeypatch):
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    assert ensure_writable_dir(tmp_path / "c", create=False) == tmp_path / "c"
    assert not (tmp_path / "c").exists()
    assert ensure_writable_dir("memory://x") is None
    (tmp_path / "f").write_text("x")
    with pytest.raises(MfdetrError, match="is a file, not a directory"):
        ensure_writable_dir(tmp_path / "f" / "sub", "--out")
    import mfdetr.utils.fs as fs

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.tempfile, "mkstemp", full)
    with pytest.raises(MfdetrError, match="no space left on the device.*free space there"):
        ensure_writable_dir(tmp_path / "d", "--out")
    assert not list(tmp_path.glob(".mfdetr-write-check-*"))


def test_disk_full_error(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "x")) and not is_disk_full(OSError(errno.EACCES, "x"))
    msg = str(disk_full_error(tmp_path / "c.zarr", 3 * 2**20, "writing the cache"))
    assert msg.startswith(f"disk full while writing the cache {tmp_path / 'c.zarr'}: ")
    assert "about 3.0 MiB more is needed" in msg
    assert " free." in msg
