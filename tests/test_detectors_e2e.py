"""Every DETR-family class of transformers, saved as a user saves a real checkpoint (``save_pretrained`` of a
tiny random model + its image processor), goes through the CLI as ``hf:PATH``: extract -> cache verify ->
train-from-cache (one epoch) -> evaluate."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from mfdetr.cli import app  # noqa: E402
from tests.hf_tiny import save_tiny  # noqa: E402
from tests.tiny_cache import extract_args  # noqa: E402
from tests.tiny_train import fast_train_flags  # noqa: E402

# one config per class (+ the timm-backbone DETR / Deformable DETR a real checkpoint uses)
E2E = [
    "detr",
    "detr_timm",
    "conditional_detr",
    "dab_detr",
    "table_transformer",
    "deformable_detr_two_stage",
    "deformable_detr_timm",
    "rt_detr",
    "rt_detr_v2",
    "d_fine",
    "deimv2",
    "lw_detr",
    "rf_detr",
    "rf_detr_seg",
]


@pytest.fixture(scope="session")
def synth_split(tmp_path_factory):
    """A 4-image synthetic split shared by every class: (images dir, annotations json)."""
    from tests.fake_detector import make_small_synth

    return make_small_synth(tmp_path_factory.mktemp("e2e_synth"), n=4, size=64, seed=3)


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, f"{args[0]}: {r.output}\n{r.exception!r}"
    return r.output


@pytest.mark.parametrize("name", E2E)
def test_extract_verify_train_evaluate(name, synth_split, tmp_path, one_thread):
    images, ann = synth_split
    folder = save_tiny(name, tmp_path / name)
    cache = str(tmp_path / "train.zarr")
    flags = dict(topk=6, block=4, batch_size=4, writers=0, extra=["--mask-size", "16"])
    _cli(*extract_args(images, ann, cache, detector=f"hf:{folder}", **flags))
    _cli("cache", "verify", cache)
    run = tmp_path / "run"
    _cli("train-from-cache", "--cache", cache, "--out", str(run), "--epochs", "1", *fast_train_flags())
    ckpt = run / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    out = tmp_path / "eval"
    _cli(
        "evaluate",
        "--cache",
        cache,
        "--checkpoint",
        str(ckpt),
        "--annotations",
        str(ann),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary  # COCOeval ran on our masks for this detector's boxes
