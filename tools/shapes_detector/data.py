"""The synth splits the shapes detector trains and validates on, held in memory, and its flip augmentation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from shapes_detector import log


def ensure_data(root: Path, train: int, val: int, size: int, seed: int) -> None:
    ok = (root / "train" / "annotations.json").exists() and (root / "val" / "annotations.json").exists()
    if ok:
        n_tr = len(json.loads((root / "train" / "annotations.json").read_text())["images"])
        n_va = len(json.loads((root / "val" / "annotations.json").read_text())["images"])
        if n_tr == train and n_va == val:
            return
    from mfdetr.data.synth import make_synth

    log(f"generating make_synth({root}, train={train}, val={val}, size={size}, seed={seed})")
    t = time.time()
    make_synth(root, train=train, val=val, size=size, seed=seed)
    log(f"generated in {time.time() - t:.0f}s")


def load_split(split_dir: Path, size: int, limit: int | None = None):
    """Images as one uint8 tensor [N,3,S,S] and targets (model label index, normalized cxcywh)."""
    from mfdetr.data.image_io import load_image

    ann = json.loads((split_dir / "annotations.json").read_text())
    cats = sorted(ann["categories"], key=lambda c: c["id"])
    cat_to_idx = {c["id"]: i for i, c in enumerate(cats)}
    images = sorted(ann["images"], key=lambda im: im["id"])
    if limit is not None:
        images = images[:limit]
    by_img: dict[int, list] = {}
    for a in ann["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    pix = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    targets = []
    for i, im in enumerate(images):
        arr = load_image(split_dir / "images" / im["file_name"]).permute(1, 2, 0).numpy()
        h, w = arr.shape[:2]
        if (h, w) != (size, size):
            raise SystemExit(f"{im['file_name']}: {h}x{w}, expected {size}x{size}")
        pix[i] = torch.from_numpy(arr).permute(2, 0, 1)
        lab, box = [], []
        for a in by_img.get(im["id"], []):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            lab.append(cat_to_idx[a["category_id"]])
            box.append([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
        targets.append(
            {
                "class_labels": torch.tensor(lab, dtype=torch.int64),
                "boxes": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
            }
        )
    return pix, targets, cats


def augment(x: torch.Tensor, t: dict, g: torch.Generator):
    """Random horizontal / vertical flips (the shapes keep their class under both)."""
    boxes = t["boxes"].clone()
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
        boxes[:, 0] = 1.0 - boxes[:, 0]
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-2)
        boxes[:, 1] = 1.0 - boxes[:, 1]
    return x, {"class_labels": t["class_labels"], "boxes": boxes}
