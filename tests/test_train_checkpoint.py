"""The checkpoint format: it records the detector's top-k and label map, so ``predict`` rebuilds exactly
the detector a label-mapped cache was made with; the one v1 migration; atomic writes on a full disk."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_json
from tests.fake_detector import FakeDetector, make_small_synth
from tests.synth_batches import SyntheticCache
from tests.tiny_train import small_train

SPEC = "py:tests.test_train_checkpoint:build"


class MappedFakeDetector(FakeDetector):
    """The fake detector with model classes 0..n-1 mapped to dataset category ids by ``label_map``
    (default: in category order), part of its fingerprint -- as the HF adapter does."""

    def __init__(self, categories: Any = None, label_map: Any = None, **kw: Any) -> None:
        super().__init__(categories=categories, **kw)
        default = {i: cid for i, cid in enumerate(self.cat_ids)}
        self.label_map = {int(k): int(v) for k, v in (label_map or default).items()}
        self.spec = SPEC
        self.fingerprint = sha256_json(
            {"base": self.fingerprint, "label_map": sorted(self.label_map.items())}
        )

    def _one(self, img):
        out = super()._one(img)
        model_ids = torch.tensor([self.cat_ids.index(int(v)) for v in out.labels], dtype=torch.int64)
        out.labels = torch.tensor([self.label_map.get(int(m), -1) for m in model_ids], dtype=torch.int64)
        return out


def build(**kw: Any) -> MappedFakeDetector:
    known = {"categories", "device", "levels", "topk", "label_map"}
    return MappedFakeDetector(**{k: v for k, v in kw.items() if k in known})


def test_label_mapped_run_predicts_with_the_detector_of_its_cache(tmp_path):
    from mfdetr.cache.reader import CacheDataset
    from mfdetr.data.coco import CocoDataset
    from mfdetr.evaluate.prediction import predict
    from mfdetr.extract.loop import ExtractOptions, extract
    from mfdetr.model.checkpoint import load_mask_net
    from mfdetr.train.loop import train_from_cache

    images, ann = make_small_synth(tmp_path / "data", n=4, size=64, seed=2)
    cats = CocoDataset(ann, images).categories
    ids = [int(c["id"]) for c in cats]
    mapping = {i: ids[(i + 1) % len(ids)] for i in range(len(ids))}  # not the default order
    det = build(categories=cats, topk=6, label_map=mapping, levels=["f8", "f16"])
    assert det.fingerprint != build(categories=cats, topk=6, levels=["f8", "f16"]).fingerprint
    res = extract(
        det,
        images,
        ann,
        out=str(tmp_path / "c.zarr"),
        opts=ExtractOptions(topk=6, block=4, mask_size=16),
        workers=0,
        progress=False,
    )
    assert CacheDataset(res.path).attrs["detector"]["label_map"] == sorted([k, v] for k, v in mapping.items())
    run = train_from_cache(res.path, tmp_path / "run", small_train(epochs=1, batch_size=2), progress=False)
    _, meta = load_mask_net(run.checkpoint)
    assert meta["detector"]["topk"] == 6 and meta["detector"]["fingerprint"] == det.fingerprint
    assert {k: v for k, v in meta["detector"]["label_map"]} == mapping
    # the detector predict rebuilds from the checkpoint alone has the cache's fingerprint: no mismatch error
    pred = predict(Path(run.checkpoint), [images], tmp_path / "pred")
    assert pred.num_images == 4 and {r["category_id"] for r in pred.results} <= set(ids)


def test_version_1_checkpoints_read_with_topk_from_their_cache_options(tmp_path):
    from mfdetr.model.checkpoint import read_checkpoint, save_checkpoint
    from mfdetr.train.loop import train_from_cache

    run = train_from_cache(SyntheticCache(8), tmp_path / "run", small_train(epochs=1), progress=False)
    ck = read_checkpoint(run.checkpoint)
    ck["format_version"] = 1
    ck["cache"]["options"] = {"topk": 7}
    del ck["detector"]["topk"], ck["detector"]["label_map"], ck["projection"]
    old = read_checkpoint(save_checkpoint(ck, tmp_path / "v1.pt"))
    assert old["detector"]["topk"] == 7 and old["detector"]["label_map"] is None
    assert "projection" not in old  # v1/v2 recorded none: evaluate skips the bases check
    ck["format_version"] = 4
    with pytest.raises(MfdetrError, match="format version 4.*upgrade mfdetr"):
        read_checkpoint(save_checkpoint(ck, tmp_path / "v4.pt"))


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")],
)
def test_a_full_disk_is_a_clear_error_and_leaves_no_temp_file(tmp_path, monkeypatch, exc):
    import shutil

    from mfdetr.model import checkpoint as ckmod

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")  # torn bytes, as a real full disk leaves them
        raise exc

    monkeypatch.setattr(torch, "save", full)
    if isinstance(exc, RuntimeError):  # torch's own message does not say ENOSPC: the free space does
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))
    with pytest.raises(MfdetrError, match=r"disk full writing checkpoint .*last.pt: it needs about .* bytes"):
        ckmod.save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
