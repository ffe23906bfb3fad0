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

from tests.fake_detector import SPEC

from mfdetr.errors import MfdetrError

TOPK = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny synth train/val splits, float32 caches, one short training run."""
    from mfdetr.cache.schema import ExtractOptions
    from mfdetr.data.synth import make_synth
    from mfdetr.extract.loop import extract
    from mfdetr.train.loop import TrainConfig, train_from_cache
    from mfdetr.model.config import MaskNetConfig

    root = tmp_path_factory.mktemp("e2e")
    info = make_synth(root / "data", train=6, val=3, size=64, seed=3, workers=1)
    opts = ExtractOptions(topk=TOPK, mask_size=16, dtype="float32")
    caches = {}
    for split in ("train", "val"):
        res = extract(SPEC, info[split]["images"], info[split]["annotations"], out=str(root / f"{split}.zarr"),
                      opts=opts, workers=0, progress=False)
        caches[split] = res.path
    cfg = TrainConfig(
        model=MaskNetConfig(dim=16, box_dim=16, roi_size=8, mask_upsample=2, image_encoder_depth=1,
                            coarse_attn_layers=0, box_encoder_layers=1, object_attn_layers=1),
        epochs=1, batch_size=3, warmup_iters=1, workers=0, device="cpu", threads=1, log_every=100,
    )
    run = train_from_cache(caches["train"], root / "run", cfg, progress=False)
    return {"root": root, "info": info, "caches": caches, "ckpt": Path(run["checkpoint"])}


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
    summary = evaluate(trained["caches"]["val"], trained["ckpt"], out=tmp_path / "eval", topk=TOPK, workers=0,
                       vis=1, progress=False)
    assert summary["num_images"] == 3
    assert len(summary["files"]["vis"]) == 1 and Path(summary["files"]["vis"][0]).is_file()
    ev = json.loads((tmp_path / "eval" / "results_segm.json").read_text())

    ds = CocoDataset(Path(val["annotations"]), Path(val["images"]))
    gt = json.loads(Path(val["annotations"]).read_text())
    files = {im["id"]: Path(val["images"]) / im["file_name"] for im in gt["images"]}
    ids = sorted(files)
    images = [files[i] for i in ids]
    pred = predict(None, trained["ckpt"], images, tmp_path / "pred", score_threshold=0.0, topk=TOPK, progress=False)
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
            assert rb["segmentation"] == ra["segmentation"] or _iou(ra["segmentation"], rb["segmentation"]) >= 0.99


def test_cli_evaluate_and_predict(trained, tmp_path):
    from typer.testing import CliRunner

    from mfdetr.cli import app

    runner = CliRunner()
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", "--cache", trained["caches"]["val"], "--checkpoint", str(trained["ckpt"]),
                            "--out", str(out), "--workers", "1", "--per-category", "--no-mask-score", "--topk", "5"])
    assert r.exit_code == 0, r.output
    assert "mask" in r.output and "box" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_category"]) == {"segm", "bbox"}
    assert summary["settings"]["mask_score"] is False
    res = json.loads((out / "results_segm.json").read_text())
    assert max(len(v) for v in _by_image(res, "image_id").values()) <= 5

    images = Path(trained["info"]["val"]["images"])
    r = runner.invoke(app, ["predict", str(images), "--checkpoint", str(trained["ckpt"]), "--detector", SPEC,
                            "--out", str(tmp_path / "pred"), "--score-threshold", "0.2"])
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
        evaluate(trained["caches"]["val"], bad, out=tmp_path / "e", workers=0, progress=False)
    img = next(Path(trained["info"]["val"]["images"]).iterdir())
    with pytest.raises(MfdetrError, match="fingerprint"):
        predict(None, bad, [img], tmp_path / "p", progress=False)
    with pytest.warns(UserWarning, match="fingerprint"):
        predict(None, bad, [img], tmp_path / "p", allow_detector_mismatch=True, progress=False)


def test_predict_bad_inputs(trained, tmp_path):
    from mfdetr.evaluate.prediction import predict

    with pytest.raises(MfdetrError, match="does not exist"):
        predict(None, trained["ckpt"], [tmp_path / "nope.png"], tmp_path / "p", progress=False)
    with pytest.raises(MfdetrError, match="checkpoint"):
        predict(None, tmp_path / "missing.pt", [tmp_path], tmp_path / "p", progress=False)
