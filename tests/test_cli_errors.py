"""CLI-level error cases (issue 18): each ends in one line ``error: ...`` naming the culprit, exit code 2,
and no traceback. Commands run in process through ``mfdetr.cli.main`` (any other exception would fail the
test with its traceback); two cases also run for real in a private mount namespace (``unshare -m``: a
read-only tmpfs, a full tmpfs), skipped where that is not allowed."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfdetr.data.image_io import MAX_PIXELS_ENV
from tests.fake_detector import SPEC, make_small_synth, subprocess_env


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run ``mfdetr ARGS`` in process; returns (exit code, stdout + stderr)."""
    from mfdetr.cli import main

    monkeypatch.setenv(MAX_PIXELS_ENV, "")  # empty = the default; undone after the test (the CLI sets it)
    monkeypatch.setattr(sys, "argv", ["mfdetr", *map(str, args)])
    with pytest.raises(SystemExit) as ex:
        main()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    code = ex.value.code if isinstance(ex.value.code, int) else (0 if ex.value.code is None else 1)
    return code, text


def error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    images, ann = make_small_synth(root / "ds", n=4, size=64)
    return images, ann


def copy_dataset(small, dst: Path) -> tuple[Path, Path, dict]:
    images, ann = small
    shutil.copytree(images, dst / "images")
    shutil.copy(ann, dst / "annotations.json")
    return dst / "images", dst / "annotations.json", json.loads(Path(ann).read_text())


def extract_args(images, ann, out, *more) -> list[str]:
    return [
        "extract",
        "--detector",
        SPEC,
        "--images",
        images,
        "--annotations",
        ann,
        "--out",
        out,
        "--workers",
        "0",
        "--writers",
        "0",
        "--block",
        "2",
        "--no-progress",
        *more,
    ]


# ------------------------------------------------------------------------------------- unwritable --out
def test_synth_out_under_a_regular_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    args = ["synth", tmp_path / "file" / "out", "--train", "1", "--val", "0"]
    code, text = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in error_line(text)


def _read_only(monkeypatch):
    """Simulate a read-only file system: creating a file answers EROFS, as the kernel does (root ignores
    chmod, so a 0o555 directory would not stop this test's root user)."""
    import mfdetr.utils.fs as fs

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fs.tempfile, "mkstemp", refuse)


def test_synth_out_on_read_only_fs(tmp_path, monkeypatch, capsys):
    _read_only(monkeypatch)
    code, text = run_cli(["synth", tmp_path / "out", "--train", "1", "--val", "0"], monkeypatch, capsys)
    assert code == 2
    line = error_line(text)
    assert "read-only file system" in line and str(tmp_path / "out") in line


def test_extract_out_under_a_regular_file(small, tmp_path, monkeypatch, capsys):
    images, ann = small
    (tmp_path / "file").write_text("x")
    code, text = run_cli(extract_args(images, ann, tmp_path / "file" / "c.zarr"), monkeypatch, capsys)
    assert code == 2
    line = error_line(text)
    assert "--out" in line and "is a file, not a directory" in line


def test_extract_out_on_read_only_fs(small, tmp_path, monkeypatch, capsys):
    images, ann = small
    _read_only(monkeypatch)
    code, text = run_cli(extract_args(images, ann, tmp_path / "c.zarr"), monkeypatch, capsys)
    assert code == 2
    line = error_line(text)
    assert "--out" in line and "read-only file system" in line
    assert not (tmp_path / "c.zarr").exists()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def unshare_error_line(script: str, timeout: int) -> str:
    """Run ``sh -c SCRIPT`` in a private mount namespace; it must exit 2 with no traceback and one
    ``error: ...`` line, which is returned."""
    p = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    return error_line(p.stderr)


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -m (a private mount namespace)")
def test_synth_on_a_real_read_only_mount(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o ro tmpfs {mnt} && {sys.executable} -m mfdetr synth {mnt}/out --train 1 --val 0"
    )
    assert "read-only file system" in unshare_error_line(script, timeout=300)


# ------------------------------------------------------------------------------------------- device
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_extract_device_cuda_without_gpu(small, tmp_path, monkeypatch, capsys):
    images, ann = small
    args = extract_args(images, ann, tmp_path / "c.zarr", "--device", "cuda")
    code, text = run_cli(args, monkeypatch, capsys)
    assert code == 2
    line = error_line(text)
    assert "--device cuda" in line and "CUDA is not available" in line and "--device cpu" in line


def test_extract_unknown_device(small, tmp_path, monkeypatch, capsys):
    images, ann = small
    args = extract_args(images, ann, tmp_path / "c.zarr", "--device", "gpu0")
    code, text = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert "'gpu0' is not a torch device" in error_line(text)


# ---------------------------------------------------------------------------------------- disk full
@pytest.mark.parametrize("writers", [0, 1])
def test_extract_disk_full_names_bytes_needed(small, tmp_path, monkeypatch, capsys, writers):
    """The third image write answers ENOSPC (simulated in the writer thread / forked writer process)."""
    from mfdetr.extract import sink

    images, ann = small
    calls = {"n": 0}
    real = sink.Sink.handle

    def handle(self, item):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, item)

    monkeypatch.setattr(sink.Sink, "handle", handle)
    args = extract_args(images, ann, tmp_path / "c.zarr")
    args[args.index("--writers") + 1] = str(writers)
    code, text = run_cli(args, monkeypatch, capsys)
    assert code == 2
    line = error_line(text)
    assert "disk full while writing the cache" in line and str(tmp_path / "c.zarr") in line
    assert "more is needed" in line and "free" in line


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -m (a private mount namespace)")
def test_extract_on_a_really_full_disk(small, tmp_path):
    """A 128 KiB tmpfs holds the store's metadata and fills during the block writes (the store needs ~250)."""
    images, ann = small
    mnt = tmp_path / "small"
    mnt.mkdir()
    args = extract_args(images, ann, mnt / "c.zarr", "--force")
    cmd = " ".join(map(str, [sys.executable, "-m", "mfdetr", *args]))
    line = unshare_error_line(f"mount -t tmpfs -o size=128k tmpfs {mnt} && {cmd}", timeout=600)
    assert "disk full while writing the cache" in line and "more is needed" in line


# --------------------------------------------------------------------- degenerate annotations, labels
def test_degenerate_annotations_reported_by_id_and_skipped(small, tmp_path, monkeypatch, capsys):
    from mfdetr.data.coco import CocoDataset

    images, ann, data = copy_dataset(small, tmp_path)
    a, b, c = data["annotations"][:3]
    a["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]  # 2 points
    b["segmentation"] = []
    c["bbox"] = [3.0, 3.0, 0.0, 4.0]
    ann.write_text(json.dumps(data))
    code, text = run_cli(extract_args(images, ann, tmp_path / "c.zarr"), monkeypatch, capsys)
    assert code == 0, text
    warn = [ln for ln in text.splitlines() if ln.startswith("warning: ") and "degenerate" in ln]
    assert len(warn) == 1 and "skipped 3 degenerate annotation(s)" in warn[0]
    for x, why in ((a, "polygon with fewer than 3 points"), (b, "empty segmentation"), (c, "zero-area box")):
        assert f"annotation id {x['id']}: {why}" in warn[0]
    ds = CocoDataset(ann, images)
    kept = {int(i) for k in range(len(ds)) for i in ds[k].ann_ids}
    assert kept == {x["id"] for x in data["annotations"]} - {a["id"], b["id"], c["id"]}


def test_unmapped_categories_warning(small, tmp_path, monkeypatch, capsys):
    images, ann, data = copy_dataset(small, tmp_path)
    data["categories"].append({"id": 99, "name": "unicorn", "supercategory": "shape"})
    ann.write_text(json.dumps(data))
    args = extract_args(images, ann, tmp_path / "c.zarr")
    args[args.index("--detector") + 1] = "shapes"
    code, text = run_cli(args, monkeypatch, capsys)
    assert code == 0, text
    warn = [ln for ln in text.splitlines() if ln.startswith("warning: ") and "map to no class" in ln]
    assert len(warn) == 1 and "'unicorn' (id 99)" in warn[0]
    from mfdetr.data.synth_shapes import CATEGORIES

    assert not [n for n in CATEGORIES if f"'{n}'" in warn[0]]  # the mapped synth categories are not listed


# ------------------------------------------------------------------------------------ image problems
def test_large_image_is_not_called_broken(small, tmp_path, monkeypatch, capsys):
    images, ann = small
    code, text = run_cli(
        ["--max-image-pixels", "1000", *extract_args(images, ann, tmp_path / "c.zarr")], monkeypatch, capsys
    )
    assert code == 2
    line = error_line(text)
    assert "is large (64x64 = 4,096 pixels), not broken" in line and "--max-image-pixels 4096" in line
    assert "truncated" not in line


def test_pillow_bomb_limit_does_not_refuse_a_valid_image(small, tmp_path, monkeypatch, capsys):
    """Pillow's own limit (here lowered below the image size) no longer decides: mfdetr's limit does."""
    images, ann = small
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 image is > 2x: Pillow alone would refuse
    code, text = run_cli(extract_args(images, ann, tmp_path / "c.zarr"), monkeypatch, capsys)
    assert code == 0, text
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after each read


def test_truncated_image_advises_the_cli_flag(small, tmp_path, monkeypatch, capsys):
    images, ann, data = copy_dataset(small, tmp_path)
    first = images / data["images"][0]["file_name"]
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(first.with_suffix(".jpg"), quality=90)
    raw = first.with_suffix(".jpg").read_bytes()
    first.with_suffix(".jpg").unlink()
    first.write_bytes(raw[: len(raw) // 2])  # a truncated JPEG under the PNG's name
    code, text = run_cli(extract_args(images, ann, tmp_path / "c.zarr"), monkeypatch, capsys)
    assert code == 2
    line = error_line(text)
    assert f"image id {data['images'][0]['id']}" in line
    assert "--skip-bad" in line and "skip_bad=True" not in line
