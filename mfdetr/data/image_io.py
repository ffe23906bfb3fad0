"""Image decoding to uint8 RGB tensors, whatever the file's mode, with clear errors.

Choices:
- EXIF orientation is NOT applied. COCO's height/width and every annotation (pycocotools included)
  refer to the stored pixel grid; rotating by the EXIF tag would move the pixels away from their
  masks and boxes (COCO train2017 has images with an orientation tag that its annotations ignore).
- Alpha (LA, RGBA, PA, P with transparency) is dropped: the stored colour is kept, not composited.
- 16-bit (I;16*, I) images map 0..65535 to 0..255 by ``round(v / 257)`` (full range, monotonic, not
  data-dependent); 32-bit float (F) images are clipped to 0..255.
- CMYK (and YCbCr) JPEGs are converted by Pillow (Adobe inverted CMYK handled by its decoder).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mfdetr.errors import MfdetrError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """[H,W,3] uint8 RGB from a loaded PIL image of any mode."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float64)
        a = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 255)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode == "P":  # palette, possibly with transparency: go through RGBA to avoid Pillow's warning
        img = img.convert("RGBA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _not_found(path: Path, what: str) -> MfdetrError:
    return MfdetrError(
        f"{what}: image file not found: {path}. Check the image root and file_name, "
        "or skip bad images (skip_bad=True)."
    )


def open_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; ``what`` names the image in error messages (e.g. "image id 7")."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, what)
    try:
        img = Image.open(path)
        img.load()  # full decode: catches truncated and corrupt files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise MfdetrError(
            f"{what}: cannot read image {path}: {type(e).__name__}: {e}. "
            "The file is unreadable or truncated; replace it, or skip bad images (skip_bad=True)."
        ) from e
    return img


def image_size(path: Path, what: str) -> tuple[int, int]:
    """(height, width) from the file header (no full decode); errors as ``open_image``."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, what)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise MfdetrError(
            f"{what}: cannot read image {path}: {type(e).__name__}: {e}. "
            "The file is unreadable; replace it, or skip bad images (skip_bad=True)."
        ) from e
    return h, w


def load_image(path: Path, what: str | None = None) -> torch.Tensor:
    """Decode an image file to a [3,H,W] uint8 RGB tensor (H, W of the stored pixels)."""
    what = what or str(path)
    img = open_image(Path(path), what)
    try:
        rgb = to_rgb_array(img)
    except (ValueError, OSError) as e:
        raise MfdetrError(f"{what}: cannot convert image {path} (mode {img.mode}) to RGB: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
