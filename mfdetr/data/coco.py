"""COCO instances reader: a torch Dataset of images, boxes, labels and instance masks.

The JSON is parsed and validated here (clear ``MfdetrError`` naming the file, image id, annotation id
or key at fault), then handed to pycocotools as a dict, so a file without "info" works and nothing is
printed. Masks follow pycocotools ``annToMask`` semantics (polygons, multi-part polygons, compressed
and uncompressed RLE), with one departure taken from detectron2: polygon parts with fewer than three
points are dropped (pycocotools would read a 4-number part as a box). Crowd annotations are kept with
``iscrowd=True``; they are never training targets, the consumer filters them.

Images are decoded by ``mfdetr.data.image_io`` (any mode to RGB, EXIF orientation not applied).
Bad images (missing, unreadable, truncated, size disagreeing with the JSON) raise, or with
``skip_bad=True`` give ``None`` and are listed in ``.bad``; structural JSON errors always raise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from mfdetr.data.annotations import find_degenerate
from mfdetr.data.image_io import image_size, load_image, open_image
from mfdetr.errors import MfdetrError
from mfdetr.utils.progress import progress_bar

__all__ = ["Sample", "CocoDataset", "load_image", "ann_to_rle"]


@dataclass
class Sample:
    """One image and its annotations (N instances, in the JSON's order)."""

    index: int  # position in the dataset (sorted image id order)
    image_id: int
    file_name: str
    image: Tensor  # [3,H,W] uint8 RGB
    boxes: Tensor  # [N,4] float32 xyxy, original pixels (from COCO xywh)
    labels: Tensor  # [N] int64 dataset category ids
    masks: Tensor | None  # [N,H,W] bool; None when the dataset has load_masks=False
    iscrowd: Tensor  # [N] bool
    ann_ids: Tensor  # [N] int64
    area: Tensor  # [N] float32 (the JSON's "area")


def ann_to_rle(segm: Any, h: int, w: int) -> dict:
    """Compressed RLE of a COCO segmentation (polygons, uncompressed or compressed RLE) for an h x w image."""
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            return mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    counts = segm["counts"]
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    return {"size": list(segm["size"]), "counts": raw}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_positive(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and len(v) > 0


def _is_box(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(map(_is_num, v)) and v[2] >= 0 and v[3] >= 0


def _is_segm(v: Any) -> bool:
    return isinstance(v, (list, dict))


def _load_json(path: Path) -> tuple[dict, bytes]:
    """Parse the annotation file; returns (dict, raw bytes)."""
    if not path.is_file():
        raise MfdetrError(f"annotation file not found: {path}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise MfdetrError(f"{path}: not a UTF-8 text file ({e}); expected a COCO instances JSON") from e
    except json.JSONDecodeError as e:
        raise MfdetrError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}. "
            "Fix the file or export it again."
        ) from e
    if not isinstance(data, dict):
        raise MfdetrError(
            f"{path}: expected a JSON object with 'images' and 'categories', got {type(data).__name__}"
        )
    return data, raw


def _validate(data: dict, path: Path, need_segm: bool) -> None:
    """Check the COCO structure in place; fill the defaults COCOeval needs (iscrowd 0, area)."""
    for key in ("images", "categories"):
        if key not in data:
            raise MfdetrError(f"{path}: missing the top-level key '{key}' (not a COCO instances file?)")
        if not isinstance(data[key], list):
            raise MfdetrError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise MfdetrError(f"{path}: 'annotations' must be a list, got {type(data['annotations']).__name__}")

    def need(obj: Any, kind: str, k: int, keys: dict[str, Any]) -> None:
        name = f"{kind} #{k}" + (f" (id {obj['id']})" if isinstance(obj, dict) and "id" in obj else "")
        if not isinstance(obj, dict):
            raise MfdetrError(f"{path}: {kind} #{k} must be a JSON object, got {type(obj).__name__}")
        for key, check in keys.items():
            if key not in obj:
                raise MfdetrError(f"{path}: {name} is missing the required key '{key}'; add it (COCO format)")
            if not check(obj[key]):
                raise MfdetrError(f"{path}: {name} has an invalid '{key}': {obj[key]!r}")

    images: dict[int, dict] = {}
    image_keys = {"id": _is_int, "file_name": _is_name, "height": _is_positive, "width": _is_positive}
    for k, img in enumerate(data["images"]):
        need(img, "image", k, image_keys)
        if img["id"] in images:
            raise MfdetrError(f"{path}: image id {img['id']} appears twice in 'images'")
        images[img["id"]] = img
    cats: set[int] = set()
    for k, cat in enumerate(data["categories"]):
        need(cat, "category", k, {"id": _is_int, "name": _is_str})
        if cat["id"] in cats:
            raise MfdetrError(f"{path}: category id {cat['id']} appears twice in 'categories'")
        cats.add(cat["id"])
    ann_ids: set[int] = set()
    keys = {"id": _is_int, "image_id": _is_int, "category_id": _is_int, "bbox": _is_box}
    if need_segm:
        keys["segmentation"] = _is_segm
    for k, ann in enumerate(data["annotations"]):
        need(ann, "annotation", k, keys)
        aid = ann["id"]
        if aid in ann_ids:
            raise MfdetrError(f"{path}: annotation id {aid} appears twice in 'annotations'")
        ann_ids.add(aid)
        if ann["image_id"] not in images:
            raise MfdetrError(
                f"{path}: annotation id {aid} points at image id {ann['image_id']}, which is not in "
                "'images'; "
                "add the image or remove the annotation"
            )
        if ann["category_id"] not in cats:
            raise MfdetrError(
                f"{path}: annotation id {aid} has category id {ann['category_id']}, which is not in "
                "'categories'; "
                "add the category or remove the annotation"
            )
        img = images[ann["image_id"]]
        if "segmentation" in ann:
            _check_segm(ann["segmentation"], img["height"], img["width"], f"{path}: annotation id {aid}")
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            if "segmentation" in ann:
                rle = ann_to_rle(ann["segmentation"], img["height"], img["width"])
                ann["area"] = float(mask_utils.area(rle))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])


def _check_segm(segm: Any, h: int, w: int, where: str) -> None:
    """Validate a segmentation (polygon list or RLE dict) for an h x w image."""
    if isinstance(segm, list):
        for p in segm:
            # cheap (first number only): COCO has ~40M coordinates
            if not isinstance(p, list) or len(p) % 2 or (p and not _is_num(p[0])):
                raise MfdetrError(f"{where}: a polygon must be a flat list of x, y numbers (even length)")
        return
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise MfdetrError(f"{where}: an RLE segmentation needs the keys 'counts' and 'size'")
    if list(segm["size"]) != [h, w]:
        raise MfdetrError(
            f"{where}: RLE size {segm['size']} differs from its image's [height, width] [{h}, {w}]"
        )
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise MfdetrError(
                f"{where}: uncompressed RLE counts must be non-negative ints summing to {h}*{w}"
            )
    elif not isinstance(counts, (str, bytes)):
        raise MfdetrError(f"{where}: RLE 'counts' must be a string or a list of ints")


class CocoDataset(torch.utils.data.Dataset):
    """COCO instances as a map-style Dataset; position ``i`` is ``image_ids[i]`` (ids sorted ascending).

    Args:
        annotations: the instances JSON.
        images: the image root; an image's path is ``images / file_name`` (sub-folders allowed).
        skip_bad: return ``None`` for a bad image (missing, unreadable, truncated, wrong size) and
            record ``(image_id, reason)`` in ``.bad`` instead of raising. Note: with DataLoader
            workers ``.bad`` fills in the workers; use ``check()`` to list bad images up front.
        load_masks: decode instance masks (else ``Sample.masks`` is None and segmentation is optional).

    ``.degenerate`` lists ``(annotation id, reason)`` of the annotations left out
    (``mfdetr.data.annotations``).
    """

    def __init__(
        self, annotations: str | Path, images: str | Path, skip_bad: bool = False, load_masks: bool = True
    ) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        self.skip_bad = skip_bad
        self.load_masks = load_masks
        data, raw = _load_json(self.annotations)
        _validate(data, self.annotations, need_segm=load_masks)
        # degenerate annotations (zero-area box, empty or < 3-point segmentation) are no instance anywhere
        images = {img["id"]: img for img in data["images"]}
        self.degenerate: list[tuple[int, str]] = find_degenerate(data["annotations"], images, load_masks)
        if self.degenerate:
            drop = {aid for aid, _ in self.degenerate}
            data = {**data, "annotations": [a for a in data["annotations"] if a["id"] not in drop]}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.categories: list[dict] = sorted(data["categories"], key=lambda c: c["id"])
        h = hashlib.sha256(raw)
        h.update(json.dumps(self.image_ids).encode())
        self.fingerprint: str = h.hexdigest()
        self.bad: list[tuple[int, str]] = []
        self._bad_ids: set[int] = set()

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, i: int) -> dict:
        """The COCO image dict (id, file_name, height, width, ...) of position ``i``."""
        return self.coco.imgs[self.image_ids[i]]

    def image_path(self, i: int) -> Path:
        return self.images / self.image_info(i)["file_name"]

    def _record_bad(self, image_id: int, reason: str) -> None:
        if image_id not in self._bad_ids:
            self._bad_ids.add(image_id)
            self.bad.append((image_id, reason))

    def _check_size(self, info: dict, h: int, w: int, path: Path) -> None:
        if (h, w) != (info["height"], info["width"]):
            raise MfdetrError(
                f"image id {info['id']} ({path}): the file is {w}x{h} (width x height) but the annotations "
                f"say {info['width']}x{info['height']}. Fix the JSON's width/height or the image "
                "(EXIF orientation is not applied, as in COCO)."
            )

    def load(self, i: int) -> tuple[Tensor, dict]:
        """Decode image ``i`` and check its size; returns ([3,H,W] uint8, image info). Raises MfdetrError."""
        info = self.image_info(i)
        path = self.image_path(i)
        image = load_image(path, what=f"image id {info['id']}")
        self._check_size(info, image.shape[1], image.shape[2], path)
        return image, info

    def __getitem__(self, i: int) -> Sample | None:
        if not 0 <= i < len(self.image_ids):
            raise IndexError(f"index {i} out of range for {len(self.image_ids)} images")
        image_id = self.image_ids[i]
        if self.skip_bad and image_id in self._bad_ids:
            return None
        try:
            image, info = self.load(i)
        except MfdetrError as e:
            if not self.skip_bad:
                raise
            self._record_bad(image_id, str(e))
            return None
        anns = self.coco.imgToAnns.get(image_id, [])
        h, w = info["height"], info["width"]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = None
        if self.load_masks:
            if anns:
                rles = [ann_to_rle(a["segmentation"], h, w) for a in anns]
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = mask_utils.decode(rles)  # [H,W,N] uint8
                masks = torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1))).bool()
            else:
                masks = torch.zeros((0, h, w), dtype=torch.bool)
        return Sample(
            index=i,
            image_id=image_id,
            file_name=info["file_name"],
            image=image,
            boxes=boxes,
            labels=torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            masks=masks,
            iscrowd=torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            ann_ids=torch.tensor([a["id"] for a in anns], dtype=torch.int64),
            area=torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
        )

    def check(self, progress: bool = True, full: bool = False) -> list[tuple[int, str]]:
        """Check every image: the file exists and opens, and its size matches the JSON (header only;
        ``full=True`` also decodes every pixel to catch truncation). Returns ``[(image_id, reason)]``
        and adds them to ``.bad`` (so ``__getitem__`` skips them when ``skip_bad``); never raises for
        an image."""
        found: list[tuple[int, str]] = []
        indices = range(len(self.image_ids))
        if progress:
            indices = progress_bar(indices, desc="check images")
        for i in indices:
            info = self.image_info(i)
            path = self.image_path(i)
            what = f"image id {info['id']}"
            try:
                if full:
                    w, h = open_image(path, what).size
                else:
                    h, w = image_size(path, what)
                self._check_size(info, h, w, path)
            except MfdetrError as e:
                found.append((info["id"], str(e)))
                self._record_bad(info["id"], str(e))
        return found
