"""Synthetic dataset: determinism, COCO validity, round trip to the rendered masks, coverage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy.ndimage import binary_fill_holes

from mfdetr.data.synth import make_split, make_synth
from mfdetr.data.synth_shapes import CATEGORIES, render_image

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SEED = 3


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_a")
    result = make_synth(out, train=50, val=10, seed=SEED, workers=1)
    assert result["train"]["num_images"] == 50 and result["val"]["num_images"] == 10
    return out


def test_deterministic_whatever_the_workers(synth_dir, tmp_path):
    make_synth(tmp_path, train=50, val=10, seed=SEED, workers=2)  # a process pool this time
    a, b = _files(synth_dir), _files(tmp_path)
    assert len(a) == 2 + 60 and a == b


def test_prefix_and_splits_disjoint(synth_dir, tmp_path):
    make_split(tmp_path, "train", 20, seed=SEED)
    full = json.loads((synth_dir / "train" / "annotations.json").read_text())
    part = json.loads((tmp_path / "annotations.json").read_text())
    assert part["images"] == full["images"][:20]
    assert part["annotations"] == [a for a in full["annotations"] if a["image_id"] <= 20]
    for j in range(20):
        name = f"images/{j:06d}.png"
        assert (tmp_path / name).read_bytes() == (synth_dir / "train" / name).read_bytes()
    make_split(tmp_path, "train", 5, seed=SEED)  # a smaller re-run removes the stale images
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{j:06d}.png" for j in range(5)]
    train = {h for k, h in _files(synth_dir / "train").items() if k.endswith(".png")}
    val = {h for k, h in _files(synth_dir / "val").items() if k.endswith(".png")}
    assert len(train) == 50 and len(val) == 10 and not train & val


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_valid_masks_inside_boxes(synth_dir, split):
    coco = COCO(str(synth_dir / split / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
    assert len(coco.anns) > 0
    for ann in coco.anns.values():
        assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
        m = coco.annToMask(ann).astype(bool)
        assert m.any() and m.sum() == ann["area"]
        x, y, w, h = (int(v) for v in ann["bbox"])
        assert m[y : y + h, x : x + w].sum() == m.sum()  # inside the box
        assert m[y].any() and m[y + h - 1].any() and m[:, x].any() and m[:, x + w - 1].any()  # tight
    for img in coco.imgs.values():
        size = Image.open(synth_dir / split / "images" / img["file_name"]).size
        assert size == (img["width"], img["height"])
    if split == "train":
        assert len({a["category_id"] for a in coco.anns.values()}) >= 6


def test_round_trip_to_rendered_masks(synth_dir):
    coco = COCO(str(synth_dir / "train" / "annotations.json"))
    for j in range(0, 50, 7):
        image, instances = render_image(SEED, "train", j, 192)
        png = np.asarray(Image.open(synth_dir / "train" / "images" / f"{j:06d}.png"))
        assert np.array_equal(png, image)
        anns = coco.imgToAnns[j + 1]
        assert len(anns) == len(instances)
        for ann, inst in zip(anns, instances):
            assert ann["category_id"] == inst.category_id
            assert np.array_equal(coco.annToMask(ann).astype(bool), inst.mask)


def test_visible_masks_do_not_overlap():
    for j in range(20):
        _, instances = render_image(SEED, "val", j, 192)
        if instances:
            assert np.stack([i.mask for i in instances]).sum(0).max() <= 1


def test_coverage_over_200_images():
    """Categories, instance counts, size ranges and ring holes over 200 rendered images.

    Size ranges are COCO's absolute ones (area < 32^2 small, > 96^2 large): the synth size classes are
    set so that at 192 px all three hold objects, so COCOeval's APs/APm/APl are all defined.
    """
    counts, areas, cats, rings, holed = [], [], set(), 0, 0
    for j in range(200):
        _, instances = render_image(SEED, "train", j, 192)
        counts.append(len(instances))
        for inst in instances:
            areas.append(int(inst.mask.sum()))
            cats.add(inst.category_id)
            if CATEGORIES[inst.category_id - 1] == "ring":
                rings += 1
                holed += bool((binary_fill_holes(inst.mask) != inst.mask).any())
    areas = np.array(areas)
    assert cats == set(range(1, 7))
    assert max(counts) <= 8 and 0 in counts and sum(c > 0 for c in counts) >= 180
    assert np.bincount(counts, minlength=9)[1:].min() > 0  # 1..8 instances all occur
    small, large = (areas < 32**2).sum(), (areas > 96**2).sum()
    medium = len(areas) - small - large
    assert min(small, medium, large) >= 20, (small, medium, large)
    assert rings >= 50 and holed > 0.6 * rings, (holed, rings)


def test_other_sizes_scale():
    image, instances = render_image(SEED, "train", 1, 64)
    assert image.shape == (64, 64, 3) and all(i.mask.shape == (64, 64) for i in instances)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from mfdetr.cli import app

    res = CliRunner().invoke(app, ["synth", str(tmp_path), "--train", "3", "--val", "2", "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert "train: 3 images" in res.output and "val: 2 images" in res.output
    assert len(list((tmp_path / "train" / "images").glob("*.png"))) == 3
    for option in ("--train", "--val", "--size", "--seed", "--workers"):
        assert option in CliRunner().invoke(app, ["synth", "--help"]).output
