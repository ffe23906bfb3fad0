"""Image decoding to uint8 RGB tensors, whatever the file's mode, with clear errors.

Choices:
- EXIF orientation is NOT applied. COCO's height/width and every annotation (pycocotools included)
  refer to the stored pixel grid; rotating by the EXIF tag would move the pixels away from their
  masks and boxes (COCO train2017 has images with an orientation tag that its annotations ignore).
- Alpha (LA, RGBA, PA, P with transparency) is dropped: the stored colour is kept, not composited.
- 16-bit (I;16*, I) images map 0..65535 to 0..255 by ``round(v / 257)`` (full range, monotonic, not
  data-dependent); 32-bit float (F) images are clipped to 0..255.
- CMYK (and YCbCr) JPEGs are converted by Pillow (Adobe inverted CMYK handled by its decoder).
- Size limit: mfdetr's own (``max_pixels``, default ``DEFAULT_MAX_IMAGE_PIXELS``, or the environment
  variable ``MFDETR_MAX_IMAGE_PIXELS``, which the CLI's ``--max-image-pixels`` sets and DataLoader workers
  inherit), checked from the header before decoding. Pillow's own decompression-bomb limit is lifted
  while mfdetr opens a file so that a large valid image is not refused as unreadable.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mfdetr.errors import MfdetrError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000
MAX_PIXELS_ENV = "MFDETR_MAX_IMAGE_PIXELS"
_PIL_LIMIT_LOCK = threading.Lock()
_READ_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)


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


def max_image_pixels() -> int:
    """The image size limit in pixels: ``MFDETR_MAX_IMAGE_PIXELS`` if set, else the default (200 MP)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise MfdetrError(f"{MAX_PIXELS_ENV}={raw!r}: the image size limit must be a positive pixel count")
    return value


def set_max_image_pixels(pixels: int) -> None:
    """Set the image size limit for this process and the worker processes it starts later."""
    if int(pixels) <= 0:
        raise MfdetrError(f"--max-image-pixels must be a positive number of pixels (got {pixels})")
    os.environ[MAX_PIXELS_ENV] = str(int(pixels))


@contextmanager
def _own_size_limit() -> Iterator[None]:
    # Pillow refuses > 2 * MAX_IMAGE_PIXELS as a bomb while opening/decoding; mfdetr's limit replaces it
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _not_found(path: Path, what: str) -> MfdetrError:
    return MfdetrError(
        f"{what}: image file not found: {path}. Check the image root and file_name, "
        "or skip bad images (--skip-bad)."
    )


def _check_pixels(size: tuple[int, int], path: Path, what: str, max_pixels: int | None) -> None:
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    w, h = size
    if w * h > limit:
        raise MfdetrError(
            f"{what}: image {path} is large ({w}x{h} = {w * h:,} pixels), not broken: it is above the "
            f"image size limit of {limit:,} pixels (a guard against decompression bombs). If the image "
            f"is genuine, raise the limit: `mfdetr --max-image-pixels {w * h} <command> ...` "
            f"(or {MAX_PIXELS_ENV}={w * h}); or skip bad images (--skip-bad)."
        )


def _unreadable(path: Path, what: str, e: BaseException, hint: str) -> MfdetrError:
    return MfdetrError(
        f"{what}: cannot read image {path}: {type(e).__name__}: {e}. "
        f"The file is {hint}; replace it, or skip bad images (--skip-bad)."
    )


def open_image(path: Path, what: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``path``; ``what`` names the image in error messages (e.g. "image id 7").
    Images above ``max_pixels`` (default ``max_image_pixels()``) are refused before decoding."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, what)
    try:
        with _own_size_limit():
            img = Image.open(path)
            _check_pixels(img.size, path, what, max_pixels)
            img.load()  # full decode: catches truncated and corrupt files
    except _READ_ERRORS as e:
        raise _unreadable(path, what, e, "unreadable or truncated") from e
    return img


def image_size(path: Path, what: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) from the file header (no full decode); errors and size limit as ``open_image``."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, what)
    try:
        with _own_size_limit(), Image.open(path) as img:
            w, h = img.size
    except _READ_ERRORS as e:
        raise _unreadable(path, what, e, "unreadable") from e
    _check_pixels((w, h), path, what, max_pixels)
    return h, w


def load_image(path: Path, what: str | None = None, max_pixels: int | None = None) -> torch.Tensor:
    """Decode an image file to a [3,H,W] uint8 RGB tensor (H, W of the stored pixels). The one image
    reader of mfdetr: datasets, extract, evaluate, predict and the shipped detector all use it."""
    what = what or str(path)
    img = open_image(Path(path), what, max_pixels)
    try:
        rgb = to_rgb_array(img)
    except (ValueError, OSError) as e:
        raise MfdetrError(f"{what}: cannot convert image {path} (mode {img.mode}) to RGB: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
