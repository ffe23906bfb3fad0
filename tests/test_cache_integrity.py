"""Damage a tiny finished cache every way disks and cut copies do; verify names it, reading refuses it in
one line, ``extract --repair`` restores the exact bytes, nothing else is touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mfdetr.cache.inspect import verify_report
from mfdetr.cache.reader import CacheDataset
from mfdetr.cli import app
from mfdetr.errors import MfdetrError
from mfdetr.extract.loop import ExtractOptions
from tests.fake_detector import make_small_synth, tree_bytes
from tests.tiny_cache import assert_same_tree, fake_extract

N, BLOCK, TOPK = 7, 2, 6
OPTS = dict(topk=TOPK, block=BLOCK, mask_size=16)


def _extract(images, ann, out, **kw):
    return fake_extract(images, ann, out, ExtractOptions(**OPTS), writers=0, **kw)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    images, ann = make_small_synth(root / "data", n=N, size=64, seed=4)
    res = _extract(images, ann, root / "ref.zarr")
    return images, ann, Path(res.path)


def _flip(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    p.write_bytes(bytes(raw))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {  # name -> (relative file, how, array named, block, quick finds it)
    "flip-feature": ("feat/f8/c/1/0/0/0", _flip, "feat/f8", 1, False),
    "truncate-feature": ("feat/f16/c/2/0/0/0", _truncate, "feat/f16", 2, True),
    "delete-feature": ("feat/f8/c/1/0/0/0", Path.unlink, "feat/f8", 1, True),
    "delete-boxes": ("boxes/c/3/0/0", Path.unlink, "boxes", 3, True),
    "delete-done": ("done/c/1", Path.unlink, "done", 1, True),
    "delete-image_id": ("image_id/c/0", Path.unlink, "image_id", 0, True),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_named_refused_and_repaired(ref, tmp_path, kind):
    images, ann, ref_path = ref
    rel, how, array, block, quick_finds = DAMAGE[kind]
    out = tmp_path / "c.zarr"
    shutil.copytree(ref_path, out)
    how(out / rel)
    before = tree_bytes(out)

    rep = verify_report(out)
    assert not rep.ok and any(p.array == array and p.block == block for p in rep.problems), rep.problems
    named = [p for p in rep.problems if p.array == array][0]
    assert block * BLOCK <= named.positions[0] < named.positions[1] <= (block + 1) * BLOCK and named.image_ids
    quick = verify_report(out, quick=True)
    assert (not quick.ok) == quick_finds
    res = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert res.exit_code == 1 and array in res.output and f"block {block}" in res.output

    # reading refuses with one line naming cache, array and the repair command
    with pytest.raises(MfdetrError) as e:
        ds = CacheDataset(out)
        for j in range(len(ds)):
            ds[j]
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and array in msg and "--repair" in msg
    with pytest.warns(UserWarning, match="damaged"):
        ds = CacheDataset(out, skip_damaged=True)
        recs = [ds[j] for j in range(len(ds))]
    good = [r for r in recs if r is not None]
    lost = set(range(N)) - {r["index"] for r in good}
    assert lost and lost <= set(range(block * BLOCK, min(N, block * BLOCK + BLOCK)))  # only damaged ones
    assert tree_bytes(out) == before  # reading and verify touch nothing

    # repair: only the damaged block is re-extracted; the store equals the uninterrupted one byte for byte
    r = _extract(images, ann, out, repair=True)
    assert r.repaired == [block] and r.images_written == len(
        range(block * BLOCK, min(N, block * BLOCK + BLOCK))
    )
    assert_same_tree(ref_path, out)
    assert verify_report(out).ok


def test_plain_rerun_repairs_a_missing_shard(ref, tmp_path):
    images, ann, ref_path = ref
    out = tmp_path / "c.zarr"
    shutil.copytree(ref_path, out)
    (out / "queries/c/2/0/0").unlink()
    r = _extract(images, ann, out)
    assert r.repaired == [2] and not r.reused
    assert tree_bytes(out) == tree_bytes(ref_path)


@pytest.mark.parametrize("which", ["zarr.json", "boxes/zarr.json"])
def test_damaged_metadata(ref, tmp_path, which):
    images, ann, ref_path = ref
    out = tmp_path / "c.zarr"
    shutil.copytree(ref_path, out)
    _truncate(out / which)
    rep = verify_report(out)
    assert not rep.ok and any(which in str(p) for p in rep.problems)
    assert CliRunner().invoke(app, ["cache", "verify", str(out)]).exit_code != 0
    with pytest.raises(MfdetrError) as e:
        CacheDataset(out)
    assert which in str(e.value) and "--repair" in str(e.value) and "\n" not in str(e.value)
    if which == "zarr.json":  # a plain rerun refuses to guess; --repair rewrites it
        with pytest.raises(MfdetrError, match="--repair"):
            fake_extract(images, ann, out, ExtractOptions(**OPTS), batch_size=4)
    r = _extract(images, ann, out, repair=True)
    assert r.images_written == 0
    assert tree_bytes(out) == tree_bytes(ref_path)


def test_partial_store_is_not_ok(ref, tmp_path):
    images, ann, ref_path = ref
    out = tmp_path / "c.zarr"
    shutil.copytree(ref_path, out)
    for b in range(4):
        (out / f"done/c/{b}").unlink()
        (out / f"manifest/c/{b}/0/0").unlink()
    rep = verify_report(out)
    assert rep.images_done == 0 and [p.kind for p in rep.problems] == ["partial"]
    res = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert res.exit_code == 1 and "0 of 7" in res.output and "ok:" not in res.output
    assert len(CacheDataset(out)) == 0 and np.array_equal(rep.images_total, N)
