"""`mfdetr run`: a tiny pipeline end to end, stage skipping, cache sharing, overrides, dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mfdetr.errors import MfdetrError
from mfdetr.pipeline.budget import dry_run, format_budget
from mfdetr.pipeline.config import load_pipeline
from mfdetr.pipeline.stages import run_pipeline

TINY = """
cache_root = "{root}/cache"
out = "{root}/runs/{name}"
[data]
kind = "synth"
root = "{root}/data"
train = 12
val = 6
size = 96
seed = 5
[detector]
spec = "py:tests.fake_detector:build"
batch_size = 4
workers = 0
[extract]
topk = 12
mask_size = 32
block = 4
[train]
epochs = 1
batch_size = 4
workers = 0
warmup_iters = 2
log_every = 1
[train.model]
dim = 32
roi_size = 8
box_dim = 16
[evaluate]
vis = 1
workers = 0
batch_size = 4
"""


def _write(root: Path, name: str, extra: str = "") -> Path:
    p = root / f"{name}.toml"
    p.write_text(TINY.format(root=root.as_posix(), name=name) + extra)
    return p


def _ran(summary: dict, stage: str) -> bool:
    return next(s for s in summary["stages"] if s["name"] == stage)["ran"]


def test_pipeline_end_to_end_rerun_and_shared_caches(tmp_path: Path, capsys) -> None:
    cfg = load_pipeline(_write(tmp_path, "a"))
    s1 = run_pipeline(cfg)
    out = capsys.readouterr().out
    assert "mask AP" in out and "box AP" in out
    assert all(_ran(s1, st) for st in ("data", "extract-train", "extract-val", "train", "evaluate"))
    assert s1["mask_ap"] is not None and 0.0 <= s1["mask_ap"] <= 1.0
    assert s1["box_ap"] is not None and 0.0 <= s1["box_ap"] <= 1.0
    assert json.loads((tmp_path / "runs/a/summary.json").read_text())["mask_ap"] == s1["mask_ap"]
    assert list((tmp_path / "runs/a/eval").rglob("*.png")), "overlays were written"
    assert s1["cache_bytes"]["train"] > 0

    # re-running does nothing again: no synth, no extraction, no training, no evaluation
    s2 = run_pipeline(load_pipeline(_write(tmp_path, "a")))
    assert not any(_ran(s2, st) for st in ("data", "extract-train", "extract-val", "train", "evaluate"))
    assert s2["mask_ap"] == s1["mask_ap"]

    # a second pipeline that differs only in the mask network re-uses both caches
    p_b = _write(tmp_path, "b", "")
    text = p_b.read_text().replace("[train.model]\n", '[train.model]\nhead = "fcn"\nfcn_roi_size = 8\n')
    p_b.write_text(text)
    s3 = run_pipeline(load_pipeline(p_b))
    assert not _ran(s3, "extract-train") and not _ran(s3, "extract-val")
    assert _ran(s3, "train") and _ran(s3, "evaluate")
    assert [st["path"] for st in s3["stages"] if st["name"].startswith("extract")] == [
        st["path"] for st in s1["stages"] if st["name"].startswith("extract")
    ]

    # the same output folder with a different mask network is refused, not overwritten
    with pytest.raises(MfdetrError, match="different configuration"):
        run_pipeline(load_pipeline(_write(tmp_path, "a"), ["train.lr=0.5"]))


def test_base_inheritance_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('name = "base"\n[train]\nepochs = 7\n[train.model]\ndim = 64\n')
    (tmp_path / "child.toml").write_text('base = "base.toml"\n[train.model]\nhead = "fcn"\n')
    cfg = load_pipeline(tmp_path / "child.toml", ["train.lr=0.01", "cache_root=/x/caches"])
    assert cfg.name == "child" and cfg.out_dir == Path("runs/child")
    assert cfg.train.epochs == 7 and cfg.train.model.dim == 64 and cfg.train.model.head == "fcn"
    assert cfg.train.lr == 0.01 and cfg.cache_root == "/x/caches"
    with pytest.raises(MfdetrError, match="trian"):
        load_pipeline(tmp_path / "child.toml", ["trian.lr=0.01"])


def test_shipped_pipelines_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "pipelines"
    files = sorted(root.rglob("*.toml"))
    assert len(files) >= 6
    for f in files:
        cfg = load_pipeline(f)
        assert cfg.name == f.stem


def test_dry_run_checks_paths_and_estimates_budget(tmp_path: Path) -> None:
    from tests.fake_detector import make_small_synth

    train_img, train_ann = make_small_synth(tmp_path / "d", n=4, size=64, seed=2)
    extra = f"""
[data]
kind = "coco"
train_images = "{train_img}"
train_annotations = "{train_ann}"
val_images = "{train_img}"
val_annotations = "{train_ann}"
"""
    p = tmp_path / "c.toml"
    p.write_text('[detector]\nspec = "py:tests.fake_detector:build"\n[extract]\ntopk = 10\n' + extra)
    report = dry_run(load_pipeline(p))
    text = format_budget(report)
    assert "train" in text and "MB/image" in text
    tr = report["splits"]["train"]
    assert tr["images"] == 4
    # independent count: sum over images and levels of C * ceil(h/s) * ceil(w/s) * 2 bytes (float16)
    import math

    from tests.fake_detector import FakeDetector

    det = FakeDetector()
    sizes = [(im["height"], im["width"]) for im in json.loads(Path(train_ann).read_text())["images"]]
    want = 0
    for h0, w0 in sizes:
        h, w = det.input_size((h0, w0))
        want += sum(
            lv.channels * math.ceil(h / lv.stride) * math.ceil(w / lv.stride) * 2 for lv in det.levels
        )
    assert sum(tr["bytes_per_level"].values()) == want

    p.write_text(p.read_text().replace(str(train_ann), str(tmp_path / "missing.json"), 1))
    with pytest.raises(MfdetrError, match="missing.json"):
        dry_run(load_pipeline(p))


def test_run_refuses_a_cache_that_does_not_fit_unless_forced(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from typer.testing import CliRunner

    from mfdetr.cli import app

    path = _write(tmp_path, "full")
    real = shutil.disk_usage
    tiny = type("U", (), {"free": 1000, "total": 10**9, "used": 0})()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: tiny if "cache" in str(p) else real(p))
    out = CliRunner().invoke(app, ["run", str(path)])
    assert isinstance(out.exception, MfdetrError) and "--force" in str(out.exception)
    assert "GB free" in str(out.exception)
    assert not list((tmp_path / "cache").glob("*/zarr.json"))  # refused before writing anything
    out = CliRunner().invoke(app, ["run", str(path), "--force"])
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "runs" / "full" / "summary.json").read_text())
    assert _ran(summary, "extract-train") and _ran(summary, "evaluate")
