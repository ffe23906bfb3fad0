"""train-from-cache: a real tiny cache with no detector/images/annotations, exact resume, clear errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.model.checkpoint import load_mask_net, read_checkpoint
from mfdetr.model.config import LossConfig, MaskNetConfig
from mfdetr.train.loop import train_from_cache
from mfdetr.train.schedule import lr_factor
from mfdetr.train.selection import train_select, val_select
from tests.synth_batches import LEVELS, SyntheticCache
from tests.tiny_train import fast_train_flags, small_train


# --------------------------------------------------------------------------- a real tiny cache
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from mfdetr.extract.loop import ExtractOptions
    from tests.fake_detector import make_small_synth
    from tests.tiny_cache import fake_extract

    root = tmp_path_factory.mktemp("tiny_train_cache")
    images, ann = make_small_synth(root / "data", n=12, size=96, seed=5)
    opts = ExtractOptions(topk=8, block=4, mask_size=16, levels=["f4", "f8", "f16"])
    res = fake_extract(images, ann, root / "train.zarr", opts, batch_size=4)
    assert res.images_done == 12
    # stage two must need none of these: the image folder and the annotation file go away
    shutil.rmtree(images)
    ann.unlink()
    return res.path


def test_trains_from_a_real_cache_alone_then_resumes_from_the_cli(tiny_cache, tmp_path, monkeypatch):
    # ... and no detector: importing the fake detector or building any detector now fails
    monkeypatch.setitem(sys.modules, "tests.fake_detector", None)
    import mfdetr.detectors.registry as registry

    def _no(*a, **k):
        raise AssertionError("the training loop built a detector")

    monkeypatch.setattr(registry, "build_detector", _no)

    from typer.testing import CliRunner

    from mfdetr.cli import app

    out = tmp_path / "run"
    args = ["train-from-cache", "--cache", tiny_cache, "--out", str(out), "--epochs", "1"]
    args += [*fast_train_flags(workers=1), "--val-cache", tiny_cache]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "val mean mask IoU" in r.output
    ck = out / "checkpoints"
    assert {p.name for p in ck.iterdir()} == {"epoch_001.pt", "last.pt", "best.pt"}
    # a second epoch through --resume (the schedule now spans 2 epochs: allowed, the model config is the same)
    args2 = args[:5] + ["--resume", "--epochs", "2"] + args[7:]
    args2[args2.index("--workers") + 1] = "0"  # (any worker count resumes the same run)
    r2 = CliRunner().invoke(app, args2)
    assert r2.exit_code == 0, r2.output + repr(r2.exception)
    assert (ck / "epoch_002.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [x["type"] for x in lines]
    assert kinds.count("epoch") == 2 and "resume" in kinds
    resume_msg = next(x for x in lines if x["type"] == "resume")["message"]
    assert "1/2 epochs done" in resume_msg and "optimizer" in resume_msg and "RNG" in resume_msg
    ep = [x for x in lines if x["type"] == "epoch"]
    assert all(0.0 <= x["val_miou"] <= 1.0 and x["val_boxes"] > 0 for x in ep)

    # the checkpoint alone rebuilds the network (evaluate / predict use this)
    model, meta = load_mask_net(ck / "last.pt")
    assert meta["epoch"] == 2 and meta["query_dim"] == 16 and meta["cache"]["fingerprint"]
    assert meta["detector"]["spec"].startswith("py:") and meta["detector"]["fingerprint"]
    assert [lv["name"] for lv in meta["levels"]] == ["f4", "f8", "f16"]
    assert meta["dataset"]["categories"] and meta["model_config"]["dim"] == 16
    from mfdetr.cache.reader import CacheDataset

    ds = CacheDataset(tiny_cache)
    batch = ds.collate([ds[0], ds[1]])
    with torch.no_grad():
        out1 = model(batch)
    assert out1["mask_logits"].shape[1:] == (8, 8) and torch.equal(out1["rows"], batch["valid"].nonzero())


# --------------------------------------------------------------------------- exact resume
def test_resume_gives_the_uninterrupted_loss_sequence_and_weights(tmp_path):
    ds, val = SyntheticCache(16), SyntheticCache(4, seed=7)
    cfg = small_train(epochs=2)
    full = train_from_cache(ds, tmp_path / "a", cfg, val_cache=val, progress=False)
    steps_per_epoch = 4
    assert full.steps == 2 * steps_per_epoch and len(full.losses) == 8

    # "1 epoch, then killed": a run dir whose last checkpoint is the one after epoch 1
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch_001.pt", b / "checkpoints" / "last.pt")
    res = train_from_cache(ds, b, cfg, val_cache=val, resume=True, progress=False)
    assert res.resumed_from == 1
    assert res.losses == full.losses[steps_per_epoch:]  # bitwise-equal floats
    wa = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    wb = read_checkpoint(b / "checkpoints" / "last.pt")
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    for sa, sb in zip(wa["optimizer"]["state"].values(), wb["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert wa["metrics"]["val_miou"] == wb["metrics"]["val_miou"]

    # resuming a finished run does nothing
    again = train_from_cache(ds, b, cfg, val_cache=val, resume=True, progress=False)
    assert again.losses == [] and again.steps == 8


def test_preloaded_cache_trains_exactly_like_the_streamed_one(tiny_cache, tmp_path):
    """preload=on (records decoded once, float16 kept compact in RAM, no loader workers) gives the
    bitwise-same loss sequence and weights as streaming the store with a worker, at equal threads."""
    from mfdetr.cache.memory import InMemoryDataset, estimate_bytes, preload
    from mfdetr.cache.reader import CacheDataset

    ds = CacheDataset(tiny_cache)
    mem = preload(ds, workers=1, progress=False)
    assert isinstance(mem, InMemoryDataset) and len(mem) == len(ds) and mem.compact  # a float16 cache
    for j in (0, len(ds) - 1):
        a, b = ds[j], mem[j]
        assert all(
            torch.equal(a["features"][k], b["features"][k]) and b["features"][k].dtype == torch.float32
            for k in a["features"]
        )
        assert torch.equal(a["queries"], b["queries"]) and torch.equal(a["mask_targets"], b["mask_targets"])
    assert 0 < estimate_bytes(ds) < len(ds) * sum(v.nbytes for v in ds[0]["features"].values())  # compact
    model = MaskNetConfig(dim=16, box_dim=8, roi_size=8)
    kw = dict(model=model, loss=LossConfig(num_points=64), epochs=2, batch_size=4, warmup_iters=1, threads=1)
    streamed, held = (
        train_from_cache(
            tiny_cache,
            tmp_path / name,
            small_train(preload=preload, workers=1, **kw),
            val_cache=tiny_cache,
            progress=False,
        )
        for name, preload in (("s", "off"), ("m", "on"))
    )
    assert held.losses == streamed.losses and held.val_miou == streamed.val_miou
    wa = read_checkpoint(tmp_path / "s" / "checkpoints" / "last.pt")["model"]
    wb = read_checkpoint(tmp_path / "m" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_different_seed_gives_a_different_run(tmp_path):
    ds = SyntheticCache(8)
    a = train_from_cache(ds, tmp_path / "a", small_train(epochs=1, seed=0), progress=False)
    b = train_from_cache(ds, tmp_path / "b", small_train(epochs=1, seed=1), progress=False)
    assert a.losses != b.losses


# --------------------------------------------------------------------------- clear errors
def test_config_and_checkpoint_mismatches_are_clear_errors(tmp_path):
    ds = SyntheticCache(8)
    with pytest.raises(MfdetrError, match=r"level\(s\) \['e8'\].*has levels.*s4"):
        train_from_cache(
            ds, tmp_path / "x", small_train(model=MaskNetConfig(levels=["s4", "e8"])), progress=False
        )

    run = tmp_path / "run"
    train_from_cache(ds, run, small_train(epochs=1), progress=False)
    with pytest.raises(MfdetrError, match="already holds checkpoints"):
        train_from_cache(ds, run, small_train(epochs=1), progress=False)
    # other channels on a level the checkpoint uses
    other = SyntheticCache(8, levels=[LEVELS[0], LevelSpec("s8", 8, 20), LEVELS[2]])
    with pytest.raises(
        MfdetrError, match=r"trained on level \{'name': 's8', 'stride': 8, 'channels': 12\}.*'channels': 20"
    ):
        train_from_cache(other, run, small_train(epochs=2), resume=True, progress=False)
    # other query width
    with pytest.raises(MfdetrError, match="queries of width 16 but .* query_dim 24"):
        train_from_cache(
            SyntheticCache(8, query_dim=24), run, small_train(epochs=2), resume=True, progress=False
        )
    # another cache of the same shapes (fingerprint)
    with pytest.raises(MfdetrError, match="fingerprint"):
        train_from_cache(SyntheticCache(8, seed=3), run, small_train(epochs=2), resume=True, progress=False)
    # another model config
    cfg = small_train(epochs=2)
    cfg.model.box_dim = 8
    with pytest.raises(MfdetrError, match="model config differs"):
        train_from_cache(ds, run, cfg, resume=True, progress=False)
    with pytest.raises(MfdetrError, match="no checkpoint"):
        train_from_cache(ds, tmp_path / "empty", small_train(), resume=True, progress=False)
    # a val cache of other levels
    with pytest.raises(MfdetrError, match="val cache"):
        train_from_cache(ds, tmp_path / "v", small_train(), val_cache=other, progress=False)
    with pytest.raises(MfdetrError, match="fp16 needs a CUDA"):
        train_from_cache(ds, tmp_path / "w", small_train(amp="fp16"), progress=False)


# --------------------------------------------------------------------------- pieces
def test_train_select_caps_matched_and_unmatched_boxes():
    torch.manual_seed(0)
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    match = torch.tensor([[1, 2, 3, -1, -1, -1], [-1, 5, -1, -1, -1, -1], [-1] * 6])
    sel = train_select({"valid": valid, "match_ann_id": match}, max_matched=2, n_unmatched=1)
    assert sel[0, :3].sum() == 2 and sel[0, 3:5].sum() == 1 and not sel[0, 5]
    assert sel[1].tolist() == [True, True, False, False, False, False]
    assert not sel[2].any() and not (sel & ~valid).any()
    sel_all = train_select({"valid": valid, "match_ann_id": match}, max_matched=0, n_unmatched=0)
    assert torch.equal(sel_all, valid & (match >= 0))
    # distinct objects first: 3 boxes of annotation 1 and one of annotation 2 -> cap 2 takes both objects
    dup = torch.tensor([[1, 1, 1, 2, -1, -1]])
    for seed in range(5):
        torch.manual_seed(seed)
        s = train_select({"valid": valid[:1], "match_ann_id": dup}, max_matched=2, n_unmatched=0)
        assert s[0, 3] and s[0, :3].sum() == 1
    none = train_select(
        {"valid": torch.zeros(2, 3, dtype=torch.bool), "match_ann_id": torch.full((2, 3), -1)}, 4, 1
    )
    assert int(none.sum()) == 1  # never empty


def test_val_select_takes_each_objects_best_box_first():
    valid = torch.ones(1, 6, dtype=torch.bool)
    batch = {
        "valid": valid,
        "match_ann_id": torch.tensor([[5, 5, 7, 5, -1, 7]]),
        "scores": torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.95, 0.5]]),
    }
    assert val_select(batch, 2)[0].tolist() == [True, False, True, False, False, False]
    assert val_select(batch, 3)[0].tolist() == [True, True, True, False, False, False]
    assert val_select(batch, 0)[0].tolist() == [True, True, True, True, False, True]


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, min_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor(70, 100, 0, kind="step", milestones=(0.67, 0.89), gamma=0.1) == pytest.approx(0.1)
    assert lr_factor(95, 100, 0, kind="step", milestones=(0.67, 0.89), gamma=0.1) == pytest.approx(0.01)
