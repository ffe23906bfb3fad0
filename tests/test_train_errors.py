"""train-from-cache on bad input, full disks and unfinished caches: one line ``error: ...``, exit code 2,
no traceback, nothing half-written left; resume falls back to the newest complete epoch checkpoint."""

from __future__ import annotations

import errno
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mfdetr.errors import MfdetrError
from mfdetr.train.config import TrainConfig, build_train_config
from mfdetr.train.loop import train_from_cache
from tests import test_train
from tests.synth_batches import SyntheticCache
from tests.tiny_train import fast_train_flags, small_train

tiny_cache = test_train.tiny_cache  # the module fixture: a real tiny cache

FAST = fast_train_flags()


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the console script's ``main`` in process; -> (exit code, stderr)."""
    from mfdetr.cli import main

    monkeypatch.setattr(sys, "argv", ["mfdetr", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    err = capsys.readouterr().err
    return code, err


def train_cli(monkeypatch, capsys, cache, out, *args: str) -> tuple[int, str]:
    """``cli`` of ``train-from-cache --cache CACHE --out OUT ARGS``."""
    return cli(monkeypatch, capsys, "train-from-cache", "--cache", str(cache), "--out", str(out), *args)


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code == 2 and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--lr", "-1"], r"--lr .*> 0.0, got -1"),
        (["--lr", "nan"], r"--lr .*got nan"),
        (["--epochs", "0"], r"--epochs .*>= 1, got 0"),
        (["--batch-size", "0"], r"--batch-size .*>= 1"),
        (["--set", "val_batch_size=0"], r"--val-batch-size"),
        (["--amp", "fp8"], r"amp: .fp8. is not one of"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, monkeypatch, capsys, args, pattern):
    code, err = train_cli(monkeypatch, capsys, tmp_path / "none.zarr", tmp_path / "run", *args)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "run").exists()


def test_config_checks_in_the_python_api():
    with pytest.raises(MfdetrError, match="--lr"):
        TrainConfig(lr=math.inf).validate()
    assert build_train_config(None, ["epochs=2"], {"lr": 0.01, "seed": None}).lr == 0.01


def test_out_under_a_file_or_read_only_is_a_one_line_error(tiny_cache, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = train_cli(monkeypatch, capsys, tiny_cache, blocker / "run", *FAST)
    assert_one_line_error(code, err, r"run directory --out .*file/run: .*file is a file, not a directory")
    code, err = train_cli(monkeypatch, capsys, tiny_cache, blocker, *FAST)
    assert_one_line_error(code, err, r"--out .* is a file")

    def read_only(*a, **k):  # root ignores permission bits: simulate the filesystem's answer
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("mfdetr.utils.fs.tempfile.mkstemp", read_only)
    code, err = train_cli(monkeypatch, capsys, tiny_cache, tmp_path / "ro", *FAST)
    assert_one_line_error(
        code, err, r"run directory --out .*ro: cannot write in .*ro \(read-only file system\)"
    )


def test_disk_full_during_training(tiny_cache, tmp_path, monkeypatch, capsys):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code, err = train_cli(monkeypatch, capsys, tiny_cache, out, "--epochs", "1", *FAST)
    assert_one_line_error(code, err, r"disk full writing checkpoint .*epoch_001.pt: it needs about .* bytes")
    assert list((out / "checkpoints").glob("*")) == []  # no *.tmp* left in the way


def test_resume_falls_back_to_the_newest_complete_epoch_and_cuts_the_metrics(tmp_path, capsys):
    ds = SyntheticCache(8)
    cfg = small_train(epochs=3)
    full = train_from_cache(ds, tmp_path / "a", cfg, progress=False)
    run = tmp_path / "b"
    shutil.copytree(tmp_path / "a", run)
    ck = run / "checkpoints"
    (ck / "epoch_003.pt").unlink()
    (ck / "epoch_002.pt").write_bytes((ck / "epoch_002.pt").read_bytes()[:1000])  # torn by a kill
    (ck / "last.pt").unlink()
    res = train_from_cache(ds, run, cfg, resume=True, progress=False)
    assert res.resumed_from == 1 and res.losses == full.losses[2:]  # 2 steps per epoch
    assert "last.pt is missing" in capsys.readouterr().err
    steps = [
        r["step"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "step"
    ]
    assert steps == list(range(1, 7))  # the killed run's steps 3..6 appear once


def test_partial_cache_is_refused_unless_allowed_and_a_grown_cache_refuses_resume(
    tmp_path, monkeypatch, capsys
):
    from mfdetr.extract.loop import ExtractOptions
    from tests.fake_detector import make_small_synth
    from tests.tiny_cache import fake_extract

    images, ann = make_small_synth(tmp_path / "data", n=12, size=64, seed=4)
    opts = ExtractOptions(topk=8, block=4, mask_size=16, levels=["f4", "f8", "f16"])
    cache = str(tmp_path / "c.zarr")
    assert fake_extract(images, ann, cache, opts, batch_size=4, shard=(0, 3)).images_done == 4
    out = tmp_path / "run"
    code, err = train_cli(monkeypatch, capsys, cache, out, "--epochs", "1", *FAST)
    assert_one_line_error(code, err, r"not complete: 4 of 12 images done.*--allow-partial")
    code, err = train_cli(monkeypatch, capsys, cache, out, "--epochs", "1", "--allow-partial", *FAST)
    assert code == 0 and "WARNING" in err and "4 done images only" in err, err
    fake_extract(images, ann, cache, opts, batch_size=4)  # the extract finishes
    code, err = train_cli(monkeypatch, capsys, cache, out, "--epochs", "2", "--resume", *FAST)
    assert_one_line_error(code, err, r"trained on 4 images .* now has 12.*start a new run")


@pytest.mark.parametrize("rel", ["feat/f8/c/1/0/0/0", "done/c/1"])
def test_a_damaged_cache_is_refused_or_skipped_with_skip_damaged(
    tiny_cache,
    tmp_path,
    monkeypatch,
    capsys,
    rel,
):
    cache = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache, cache)
    (cache / rel).unlink()  # block 1 (images 4..7) of 3
    out = tmp_path / "run"
    code, err = train_cli(monkeypatch, capsys, cache, out, "--epochs", "1", *FAST)
    assert_one_line_error(code, err, r"damaged.*--repair")
    with pytest.warns(UserWarning, match="damaged"):
        code, err = train_cli(monkeypatch, capsys, cache, out, "--epochs", "1", "--skip-damaged", *FAST)
    assert code == 0 and "skipping 1 damaged block(s) [1]" in err and "other 8 images" in err, err
    assert "not complete" not in err
