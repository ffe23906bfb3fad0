"""PCA-projected caches: the val split adopts the train split's bases (``--calib-from``), training and
evaluation refuse a cache in other bases, and ``predict`` projects live maps into the checkpoint's bases
(its masks equal ``evaluate``'s over the projected cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mfdetr.cache.reader import CacheDataset
from mfdetr.cache.schema import ExtractOptions
from mfdetr.cache.storage import projection_id
from mfdetr.errors import MfdetrError
from mfdetr.evaluate.config import EvalConfig, PredictConfig
from mfdetr.extract.loop import extract
from tests.fake_detector import SPEC

TOPK = 10
OPTS = ExtractOptions(topk=TOPK, mask_size=16, dtype="float32", project={"f8": 3, "f16": 3}, calib_images=2)


def _extract(info, split, out, **kw):
    return extract(
        SPEC,
        info[split]["images"],
        info[split]["annotations"],
        out=str(out),
        opts=OPTS,
        workers=0,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from mfdetr.data.synth import make_synth

    root = tmp_path_factory.mktemp("proj")
    info = make_synth(root / "data", train=6, val=3, size=64, seed=5, workers=1)
    train = _extract(info, "train", root / "train.zarr")
    own = _extract(info, "val", root / "val_own.zarr")  # its own bases: the mistake the checks catch
    shared = _extract(info, "val", root / "val.zarr", calib_from=train.path)
    return {"root": root, "info": info, "train": train, "own": own, "val": shared}


def _train(caches, val=None):
    from mfdetr.model.config import MaskNetConfig
    from mfdetr.train.loop import train_from_cache
    from tests.tiny_train import small_train

    net = MaskNetConfig(
        dim=16, box_dim=16, roi_size=8, image_encoder_depth=1, coarse_attn_layers=0, box_encoder_layers=1
    )
    cfg = small_train(model=net, epochs=1, batch_size=3, warmup_iters=1, log_every=100)
    out = caches["root"] / ("run" if val is None else f"run_{Path(val).stem}")
    return train_from_cache(caches["train"].path, out, cfg, val_cache=val, progress=False)


def test_the_val_split_adopts_the_train_bases(caches):
    train, own, val = (CacheDataset(caches[k].path) for k in ("train", "own", "val"))
    pid = projection_id(train.attrs["storage"])
    assert pid is not None and projection_id(val.attrs["storage"]) == pid
    assert projection_id(own.attrs["storage"]) != pid  # fitted on other images: other bases
    assert caches["val"].fingerprint != caches["own"].fingerprint  # so reuse never mixes them up
    assert val.attrs["calib_source"]["path"] == str(caches["train"].path)
    assert [lv.channels for lv in val.levels] == [3, 3]


def test_training_and_evaluation_refuse_other_bases(caches, tmp_path):
    from mfdetr.evaluate.evaluation import evaluate

    with pytest.raises(MfdetrError, match="other PCA bases.*--calib-from"):
        _train(caches, val=caches["own"].path)
    run = _train(caches)
    with pytest.raises(MfdetrError, match="other PCA bases.*--calib-from"):
        evaluate(
            caches["own"].path,
            run.checkpoint,
            EvalConfig(topk=TOPK, workers=0, progress=False),
            out=tmp_path / "e",
        )


def test_calib_from_refuses_other_storage_options(caches, tmp_path):
    info = caches["info"]
    other = ExtractOptions(**{**OPTS.__dict__, "project": {"f8": 2, "f16": 3}})
    with pytest.raises(MfdetrError, match="--calib-from .*project"):
        extract(
            SPEC,
            info["val"]["images"],
            info["val"]["annotations"],
            out=str(tmp_path / "x.zarr"),
            opts=other,
            workers=0,
            progress=False,
            calib_from=caches["train"].path,
        )


def test_predict_projects_live_maps_like_the_cache(caches, tmp_path):
    from mfdetr.evaluate.evaluation import evaluate
    from mfdetr.evaluate.prediction import predict

    run = _train(caches, val=caches["val"].path)
    evaluate(
        caches["val"].path,
        run.checkpoint,
        EvalConfig(topk=TOPK, workers=0, progress=False),
        out=tmp_path / "eval",
    )
    ev = json.loads((tmp_path / "eval" / "results_segm.json").read_text())
    val = caches["info"]["val"]
    gt = json.loads(Path(val["annotations"]).read_text())
    ids = sorted(im["id"] for im in gt["images"])
    files = {im["id"]: Path(val["images"]) / im["file_name"] for im in gt["images"]}
    pred = predict(
        run.checkpoint,
        [files[i] for i in ids],
        tmp_path / "pred",
        PredictConfig(score_threshold=0.0, topk=TOPK, vis=0, progress=False),
    ).results
    assert len(ev) == len(pred) > 0
    by_pos = {}
    for r in pred:
        by_pos.setdefault(r["image_id"], []).append(r)
    for pos, iid in enumerate(ids):
        a = [r for r in ev if r["image_id"] == iid]
        b = by_pos.get(pos, [])
        assert [r["segmentation"] for r in a] == [r["segmentation"] for r in b]
        assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)
