"""Builds small COCO datasets with every quirk the reader must handle, and broken variants of them.

``make_quirky_coco(tmp)`` writes ``tmp/annotations.json`` (no "info" key) and ``tmp/images/`` with:
- images in modes RGB (PNG), L, LA, P with transparency, RGBA, CMYK JPEG, 16-bit grayscale PNG, an
  RGB JPEG carrying an EXIF orientation tag (stored pixels are what counts), one with no annotations;
- file names in sub-folders, sparse image ids listed out of order, non-contiguous category ids;
- polygons (multi-part, and one with a degenerate 2-point part), compressed RLE (a ring, with a
  hole), uncompressed RLE (a crowd annotation).
``EXPECTED`` gives a known pixel colour per image id; ``make_bad_coco(tmp, *kinds)`` applies broken
variants (``BAD_KINDS``) and returns the strings each error message must contain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 5, "name": "car"}]

# image id -> (file_name, width, height, (row, col), expected RGB at that pixel, tolerance)
EXPECTED: dict[int, tuple[str, int, int, tuple[int, int], tuple[int, int, int], int]] = {
    3: ("sub/dir/rgb.png", 40, 30, (10, 10), (200, 100, 50), 0),
    10: ("gray.png", 32, 24, (0, 0), (77, 77, 77), 0),
    11: ("nested/la.png", 20, 16, (3, 3), (150, 150, 150), 0),
    25: ("palette.png", 24, 24, (5, 5), (12, 34, 56), 0),
    40: ("rgba.png", 16, 20, (2, 2), (255, 0, 0), 0),
    41: ("cmyk.jpg", 32, 32, (16, 16), (255, 0, 0), 6),
    100: ("deep/16bit.png", 24, 18, (9, 12), (128, 128, 128), 0),
    7: ("empty.jpg", 24, 16, (8, 12), (40, 160, 90), 6),
    55: ("exif_rot.jpg", 40, 20, (10, 5), (250, 250, 250), 8),  # EXIF says rotate; stored pixels win
}
DEGENERATE_ANN = 108  # polygon with a 2-point part that the reader drops (pycocotools would misread it)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (counts list, column-major, starting with zeros) of a [H,W] bool mask."""
    flat = mask.ravel(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _write_images(root: Path) -> None:
    def path(iid: int) -> Path:
        p = root / EXPECTED[iid][0]
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    a = np.full((30, 40, 3), (10, 20, 30), np.uint8)
    a[5:16, 5:16] = (200, 100, 50)
    Image.fromarray(a).save(path(3))
    Image.new("L", (32, 24), 77).save(path(10))
    Image.new("LA", (20, 16), (150, 10)).save(path(11))
    p = Image.new("P", (24, 24), 2)
    p.putpalette([0, 0, 0, 255, 255, 255, 12, 34, 56] + [0] * (256 * 3 - 9))
    p.info["transparency"] = 0
    p.save(path(25), transparency=0)
    Image.new("RGBA", (16, 20), (255, 0, 0, 0)).save(path(40))
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path(41), quality=95)
    d = np.full((18, 24), 65535, np.uint16)
    d[5:14, 8:20] = 128 * 257
    Image.fromarray(d).save(path(100))
    Image.new("RGB", (24, 16), (40, 160, 90)).save(path(7), quality=95)
    e = np.zeros((20, 40, 3), np.uint8)
    e[:, :20] = 250  # left half white; rotating by the EXIF tag would make this a 20x40 image
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(e).save(path(55), quality=95, exif=exif)


def _annotations() -> list[dict]:
    ring = np.zeros((24, 24), bool)
    yy, xx = np.mgrid[:24, :24]
    r = np.hypot(yy - 12, xx - 12)
    ring[(r <= 9) & (r >= 4)] = True
    crowd = np.zeros((30, 40), bool)
    crowd[18:28, 2:30] = True
    crowd[20:24, 10:14] = False
    gray = np.zeros((24, 32), bool)
    gray[3:9, 4:20] = True
    gray[15:20, 25:30] = True

    def ann(aid: int, iid: int, cat: int, segm, bbox, crowd_flag: int = 0) -> dict:
        h, w = EXPECTED[iid][2], EXPECTED[iid][1]
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects([q for q in segm if len(q) >= 6], h, w))
        elif isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = {"size": segm["size"], "counts": segm["counts"].encode()}
        return {
            "id": aid,
            "image_id": iid,
            "category_id": cat,
            "segmentation": segm,
            "area": float(mask_utils.area(rle)),
            "bbox": bbox,
            "iscrowd": crowd_flag,
        }

    return [
        # multi-part polygon: two triangles far apart
        ann(101, 3, 5, [[2, 2, 14, 2, 2, 12], [25.5, 5, 38, 5, 31, 20.5]], [2.0, 2.0, 36.0, 18.5]),
        ann(102, 3, 90, uncompressed_rle(crowd), [2.0, 18.0, 28.0, 10.0], crowd_flag=1),
        ann(103, 10, 1, compressed_rle(gray), [4.0, 3.0, 26.0, 17.0]),
        ann(104, 11, 1, [[1, 1, 18, 1, 18, 14, 1, 14]], [1.0, 1.0, 17.0, 13.0]),
        ann(105, 25, 5, compressed_rle(ring), [3.0, 3.0, 19.0, 19.0]),
        ann(106, 40, 90, [[0, 0, 15, 0, 8, 19]], [0.0, 0.0, 15.0, 19.0]),
        ann(107, 100, 1, [[8, 5, 20, 5, 20, 14, 8, 14]], [8.0, 5.0, 12.0, 9.0]),
        ann(DEGENERATE_ANN, 100, 5, [[1, 1, 6, 1, 6, 6, 1, 6], [10, 10, 12, 12]], [1.0, 1.0, 5.0, 5.0]),
        ann(109, 41, 90, [[4, 4, 28, 4, 16, 28]], [4.0, 4.0, 24.0, 24.0]),
        ann(110, 55, 5, [[2, 2, 18, 2, 18, 18, 2, 18]], [2.0, 2.0, 16.0, 16.0]),
    ]


def quirky_dataset() -> dict:
    """The quirky COCO dict (no "info"; images out of id order)."""
    order = [25, 3, 100, 7, 10, 55, 41, 11, 40]
    images = [
        {"id": i, "file_name": EXPECTED[i][0], "width": EXPECTED[i][1], "height": EXPECTED[i][2]}
        for i in order
    ]
    return {"images": images, "annotations": _annotations(), "categories": [dict(c) for c in CATEGORIES]}


def make_quirky_coco(tmp: Path) -> tuple[Path, Path]:
    """Write the quirky dataset under ``tmp``; returns (annotations json, image root)."""
    tmp = Path(tmp)
    root = tmp / "images"
    _write_images(root)
    ann_path = tmp / "annotations.json"
    ann_path.write_text(json.dumps(quirky_dataset(), indent=1))
    return ann_path, root


# kind -> True when the fault is in one image (skip_bad skips it), False for a JSON-level fault
BAD_KINDS = {
    "missing_file": True,
    "truncated_png": True,
    "truncated_jpeg": True,
    "unreadable_image": True,
    "size_mismatch": True,
    "invalid_json": False,
    "missing_image_key": False,
    "missing_ann_key": False,
    "missing_cat_key": False,
    "unknown_image": False,
    "unknown_category": False,
}
# image-level kinds: the image id each one breaks
BAD_IMAGE_IDS = {
    "missing_file": 10,
    "truncated_png": 3,
    "truncated_jpeg": 41,
    "unreadable_image": 40,
    "size_mismatch": 11,
}


def make_bad_coco(tmp: Path, *kinds: str) -> tuple[Path, Path, list[str]]:
    """The quirky dataset with the faults ``kinds`` applied (image-level kinds combine).

    Returns (annotations json, image root, strings that the error message must contain).
    """
    ann_path, root = make_quirky_coco(tmp)
    data = quirky_dataset()
    img = {i["id"]: i for i in data["images"]}
    anns = {a["id"]: a for a in data["annotations"]}
    must: list[str] = []
    text = None
    for kind in kinds:
        iid = BAD_IMAGE_IDS.get(kind)
        file = root / EXPECTED[iid][0] if iid is not None else None
        if kind == "missing_file":
            file.unlink()
            must += ["image id 10", "gray.png"]
        elif kind in ("truncated_png", "truncated_jpeg"):
            raw = file.read_bytes()
            file.write_bytes(raw[: len(raw) // 2])
            must += [f"image id {iid}", file.name]
        elif kind == "unreadable_image":
            file.write_bytes(b"this is not an image\n" * 4)
            must += ["image id 40", "rgba.png"]
        elif kind == "size_mismatch":
            img[11]["width"] += 1
            must += ["image id 11", "la.png", "21x16", "20x16"]
        elif kind == "invalid_json":
            text = json.dumps(data, indent=1).replace('"zebra"', '"zebra",,', 1)
            line = text[: text.index('"zebra",,')].count("\n") + 1
            must += ["annotations.json", f"line {line}"]
        elif kind == "missing_image_key":
            del img[25]["file_name"]
            must += ["id 25", "'file_name'"]
        elif kind == "missing_ann_key":
            del anns[104]["category_id"]
            must += ["id 104", "'category_id'"]
        elif kind == "missing_cat_key":
            del next(c for c in data["categories"] if c["id"] == 5)["name"]
            must += ["id 5", "'name'"]
        elif kind == "unknown_image":
            anns[103]["image_id"] = 999
            must += ["annotation id 103", "999"]
        elif kind == "unknown_category":
            anns[105]["category_id"] = 2
            must += ["annotation id 105", "category id 2"]
        else:
            raise ValueError(f"unknown bad kind {kind!r}; one of {sorted(BAD_KINDS)}")
    ann_path.write_text(text if text is not None else json.dumps(data, indent=1))
    return ann_path, root, must
