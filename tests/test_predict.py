"""End to end: fake detector -> extract -> a tiny trained mask net -> ``evaluate`` and ``predict``.

``predict`` (live: detector -> records_from_detections -> mask net -> paste) must give the same masks
as ``evaluate`` over a cache of the same images (float32 cache: identical RLEs; float16: IoU >= 0.99
where the masks are confident). Also the CLIs and the checkpoint/cache mismatch errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools import mask as mask_util

from mfdetr.errors import MfdetrError
from mfdetr.evaluate.config import EvalConfig, PredictConfig
from tests.fake_detector import SPEC

TOPK = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny synth train/val splits, float32 caches with the pixel level px1, one short training run of
    a net with the pixel refinement (``predict`` rebuilds the pixel level from the checkpoint's levels)."""
    from mfdetr.cache.schema import ExtractOptions
    from mfdetr.data.synth import make_synth
    from mfdetr.extract.loop import extract
    from mfdetr.model.config import LossConfig, MaskNetConfig
    from mfdetr.train.loop import train_from_cache
    from tests.tiny_train import small_train

    root = tmp_path_factory.mktemp("e2e")
    info = make_synth(root / "data", train=6, val=3, size=64, seed=3, workers=1)
    opts = ExtractOptions(topk=TOPK, mask_size=16, dtype="float32", levels=["f8", "f16", "px1"])
    caches = {}
    for split in ("train", "val"):
        res = extract(
            SPEC,
            info[split]["images"],
            info[split]["annotations"],
            out=str(root / f"{split}.zarr"),
            opts=opts,
            workers=0,
            progress=False,
        )
        caches[split] = res.path
    # narrow and shallow (one block per stage, no cross-level attention), 16x16 refined masks
    shallow = dict(image_encoder_depth=1, coarse_attn_layers=0, box_encoder_layers=1)
    refine = dict(pixel_refine=16, refine_points=32, refine_infer_points=64)
    net = MaskNetConfig(dim=16, box_dim=16, roi_size=8, **refine, **shallow)
    cfg = small_train(model=net, loss=LossConfig(), epochs=1, batch_size=3, warmup_iters=1, log_every=100)
    run = train_from_cache(caches["train"], root / "run", cfg, progress=False)
    return {"root": root, "info": info, "caches": caches, "ckpt": Path(run.checkpoint)}


def _by_image(results, key):
    out = {}
    for r in results:
        out.setdefault(r[key], []).append(r)
    return out


def _iou(a, b):
    da = mask_util.decode({"size": a["size"], "counts": a["counts"].encode()}).astype(bool)
    db = mask_util.decode({"size": b["size"], "counts": b["counts"].encode()}).astype(bool)
    union = (da | db).sum()
    return 1.0 if union == 0 else (da & db).sum() / union


def test_predict_equals_evaluate(trained, tmp_path):
    from mfdetr.data.coco import CocoDataset
    from mfdetr.evaluate.evaluation import evaluate
    from mfdetr.evaluate.prediction import predict

    val = trained["info"]["val"]
    summary = evaluate(
        trained["caches"]["val"],
        trained["ckpt"],
        EvalConfig(topk=TOPK, workers=0, vis=1, progress=False),
        out=tmp_path / "eval",
    )
    assert summary.num_images == 3
    assert len(summary.files["vis"]) == 1 and Path(summary.files["vis"][0]).is_file()
    ev = json.loads((tmp_path / "eval" / "results_segm.json").read_text())

    ds = CocoDataset(Path(val["annotations"]), Path(val["images"]))
    gt = json.loads(Path(val["annotations"]).read_text())
    files = {im["id"]: Path(val["images"]) / im["file_name"] for im in gt["images"]}
    ids = sorted(files)
    images = [files[i] for i in ids]
    pred = predict(
        trained["ckpt"],
        images,
        tmp_path / "pred",
        PredictConfig(score_threshold=0.0, topk=TOPK, progress=False),
    )
    assert pred.num_images == len(images) and pred.skipped == []
    pred = pred.results
    assert (tmp_path / "pred" / "predictions.json").is_file()
    assert len(list((tmp_path / "pred" / "vis").glob("*.png"))) == len(images)
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == pred
    names = {c["id"]: c["name"] for c in ds.categories}
    ev_by, pr_by = _by_image(ev, "image_id"), _by_image(pred, "image_id")
    assert len(ev) == len(pred) > 0
    for pos, iid in enumerate(ids):
        a, b = ev_by.get(iid, []), pr_by.get(pos, [])
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            assert rb["file_name"] == str(files[iid])
            assert rb["category_id"] == ra["category_id"]
            assert rb["category_name"] == names[ra["category_id"]]
            assert rb["bbox"] == pytest.approx(ra["bbox"], abs=1e-3)
            assert rb["score"] == pytest.approx(ra["score"], abs=1e-5)
            assert (
                rb["segmentation"] == ra["segmentation"]
                or _iou(ra["segmentation"], rb["segmentation"]) >= 0.99
            )


def test_cli_evaluate_and_predict(trained, tmp_path):
    from typer.testing import CliRunner

    from mfdetr.cli import app

    runner = CliRunner()
    out = tmp_path / "eval"
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            trained["caches"]["val"],
            "--checkpoint",
            str(trained["ckpt"]),
            "--out",
            str(out),
            "--workers",
            "1",
            "--per-category",
            "--no-mask-score",
            "--topk",
            "5",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "mask" in r.output and "box" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_category"]) == {"segm", "bbox"}
    assert summary["settings"]["mask_score"] is False
    res = json.loads((out / "results_segm.json").read_text())
    assert max(len(v) for v in _by_image(res, "image_id").values()) <= 5

    images = Path(trained["info"]["val"]["images"])
    r = runner.invoke(
        app,
        [
            "predict",
            str(images),
            "--checkpoint",
            str(trained["ckpt"]),
            "--detector",
            SPEC,
            "--out",
            str(tmp_path / "pred"),
            "--score-threshold",
            "0.2",
        ],
    )
    assert r.exit_code == 0, r.output
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert all(p["score"] >= 0.2 for p in pred)


def _tampered(ckpt: Path, tmp_path: Path, **detector) -> Path:
    from mfdetr.model.checkpoint import read_checkpoint, save_checkpoint

    ck = read_checkpoint(ckpt)
    ck["detector"] = {**ck["detector"], **detector}
    return save_checkpoint(ck, tmp_path / "tampered.pt")


def test_checkpoint_from_another_detector(trained, tmp_path):
    from mfdetr.evaluate.evaluation import evaluate
    from mfdetr.evaluate.prediction import predict

    bad = _tampered(trained["ckpt"], tmp_path, fingerprint="0" * 64)
    with pytest.raises(MfdetrError, match="fingerprint"):
        evaluate(trained["caches"]["val"], bad, EvalConfig(workers=0, progress=False), out=tmp_path / "e")
    img = next(Path(trained["info"]["val"]["images"]).iterdir())
    with pytest.raises(MfdetrError, match="fingerprint"):
        predict(bad, [img], tmp_path / "p", PredictConfig(progress=False))
    with pytest.warns(UserWarning, match="fingerprint"):
        predict(bad, [img], tmp_path / "p", PredictConfig(allow_detector_mismatch=True, progress=False))


def test_predict_bad_inputs(trained, tmp_path):
    from mfdetr.evaluate.prediction import predict

    with pytest.raises(MfdetrError, match="does not exist"):
        predict(trained["ckpt"], [tmp_path / "nope.png"], tmp_path / "p", PredictConfig(progress=False))
    with pytest.raises(MfdetrError, match="checkpoint"):
        predict(tmp_path / "missing.pt", [tmp_path], tmp_path / "p", PredictConfig(progress=False))


# ------------------------------------------------------------------ evaluators and CLI errors
def test_faster_and_pycocotools_agree_on_our_results(trained, tmp_path):
    from mfdetr.evaluate.evaluation import evaluate

    runs = {}
    for ev in ("faster", "pycocotools"):
        cfg = EvalConfig(topk=TOPK, workers=0, progress=False, evaluator=ev, per_category=True)
        runs[ev] = evaluate(trained["caches"]["val"], trained["ckpt"], cfg, out=tmp_path / ev)
    a, b = runs["faster"].metrics, runs["pycocotools"].metrics
    assert a.segm.stats == pytest.approx(b.segm.stats, abs=1e-4)
    assert a.bbox.stats == pytest.approx(b.bbox.stats, abs=1e-4)
    assert a.segm.per_category == pytest.approx(b.segm.per_category, abs=1e-4)
    assert runs["faster"].boundary_ap is not None and runs["pycocotools"].boundary_ap is None
    saved = json.loads((tmp_path / "faster" / "summary.json").read_text())
    assert {"mask_ap", "box_ap", "boundary_ap", "occluded_ap", "boundary", "occluded"} <= set(saved)
    assert saved["boundary_ap"] == runs["faster"].boundary_ap


def cli(args, capsys) -> tuple[int, str, str]:
    """Run ``mfdetr ARGS`` through the console-script entry point; (exit code, stdout, stderr)."""
    import sys

    from mfdetr.cli import main

    old, sys.argv = sys.argv, ["mfdetr", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_clean_error(code: int, out: str, err: str, *must: str) -> None:
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert all(m in err for m in must), err


def _eval_args(trained, out, *extra):
    return [
        "evaluate",
        "--cache",
        trained["caches"]["val"],
        "--checkpoint",
        trained["ckpt"],
        "--out",
        out,
        "--workers",
        "0",
        *extra,
    ]


def test_cli_evaluate_invalid_json(trained, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1, "height": 64\n]}')
    code, out, err = cli(_eval_args(trained, tmp_path / "e", "--annotations", bad), capsys)
    assert_clean_error(code, out, err, str(bad), "line 3", "column 1")


def test_cli_out_under_a_file_or_read_only(trained, tmp_path, capsys, monkeypatch):
    import errno

    (tmp_path / "f.txt").write_text("x")
    under_file = tmp_path / "f.txt" / "sub"
    code, out, err = cli(_eval_args(trained, under_file), capsys)
    assert_clean_error(code, out, err, "--out", str(under_file))
    images = trained["info"]["val"]["images"]
    pred = ["predict", images, "--checkpoint", trained["ckpt"], "--detector", SPEC]
    code, out, err = cli([*pred, "--out", under_file], capsys)
    assert_clean_error(code, out, err, "--out", str(under_file))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("mfdetr.utils.fs.tempfile.mkstemp", read_only)
    code, out, err = cli(_eval_args(trained, tmp_path / "ro"), capsys)
    assert_clean_error(code, out, err, "--out", "read-only file system")
    code, out, err = cli([*pred, "--out", tmp_path / "ro2"], capsys)
    assert_clean_error(code, out, err, "--out", "read-only file system")


def test_cli_evaluate_degenerate_gt(trained, tmp_path, capsys):
    val = json.loads(Path(trained["info"]["val"]["annotations"]).read_text())
    a, b = val["annotations"][0], val["annotations"][1]
    a["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]  # 2 points
    b["segmentation"] = []
    ann = tmp_path / "degenerate.json"
    ann.write_text(json.dumps(val))
    for ev in ("faster", "pycocotools"):
        code, out, err = cli(
            _eval_args(trained, tmp_path / ev, "--annotations", ann, "--evaluator", ev), capsys
        )
        assert code == 0, err
        assert (
            "warning:" in err
            and f"annotation id {a['id']}" in err
            and f"annotation id {b['id']}" in err
            and "Traceback" not in err
        )
        assert "mask" in out and "box" in out and ("boundary" in out) == (ev == "faster")
        saved = json.loads((tmp_path / ev / "summary.json").read_text())
        assert saved["degenerate_annotations"] == [a["id"], b["id"]]


def test_cli_predict_truncated_jpeg(trained, tmp_path, capsys):
    import shutil

    from PIL import Image

    folder = tmp_path / "imgs"
    shutil.copytree(trained["info"]["val"]["images"], folder)
    good = sorted(folder.iterdir())
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
    args = ["predict", folder, "--checkpoint", trained["ckpt"], "--detector", SPEC, "--score-threshold", "0"]
    code, out, err = cli([*args, "--out", tmp_path / "p1"], capsys)
    assert_clean_error(code, out, err, "broken.jpg", "--skip-bad")
    assert "skip_bad" not in err

    code, out, err = cli([*args, "--out", tmp_path / "p2", "--skip-bad"], capsys)
    assert code == 0, err
    assert "warning:" in err and "broken.jpg" in err and "Traceback" not in err
    pred = json.loads((tmp_path / "p2" / "predictions.json").read_text())
    assert {p["file_name"] for p in pred} == {str(p) for p in good}
    assert len(list((tmp_path / "p2" / "vis").glob("*.png"))) == len(good)
