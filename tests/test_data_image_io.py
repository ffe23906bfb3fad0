"""Image reading (``mfdetr.data.image_io``): mfdetr's own size limit replaces Pillow's bomb check."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mfdetr.data.image_io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    image_size,
    load_image,
    max_image_pixels,
    set_max_image_pixels,
)
from mfdetr.errors import MfdetrError


def png_claiming(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression-bomb-like file)."""
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    raw[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    raw[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(raw))


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "")  # empty = default; setenv (unlike delenv) undoes later sets


def test_header_bomb_refused_before_decoding(tmp_path, no_env):
    p = tmp_path / "bomb.png"
    png_claiming(p, 30000, 30000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(p) as im:
            assert im.size == (30000, 30000)  # the crafted header reads back
    for read in (lambda: load_image(p, "image id 5"), lambda: image_size(p, "image id 5")):
        with pytest.raises(MfdetrError) as e:
            read()
        msg = str(e.value)
        assert msg.startswith("image id 5:")
        assert "is large (30000x30000 = 900,000,000 pixels), not broken" in msg
        assert f"{DEFAULT_MAX_IMAGE_PIXELS:,} pixels" in msg and "--max-image-pixels 900000000" in msg


def test_limit_from_argument_env_and_setter(tmp_path, no_env, monkeypatch):
    p = tmp_path / "a.png"
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(p)
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(MfdetrError, match="is large"):
        load_image(p, max_pixels=1199)
    assert load_image(p, max_pixels=1200).shape == (3, 30, 40)
    set_max_image_pixels(1000)  # the CLI's --max-image-pixels; workers inherit the environment
    assert max_image_pixels() == 1000
    with pytest.raises(MfdetrError, match="--max-image-pixels 1200"):
        image_size(p, "x")
    monkeypatch.setenv(MAX_PIXELS_ENV, "nonsense")
    with pytest.raises(MfdetrError, match=MAX_PIXELS_ENV):
        max_image_pixels()
    with pytest.raises(MfdetrError, match="positive"):
        set_max_image_pixels(0)


def test_pillow_limit_neither_decides_nor_leaks(tmp_path, no_env, monkeypatch):
    p = tmp_path / "a.jpg"
    arr = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(p, quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone refuses > 200 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(p)
    img = load_image(p)
    with pytest.MonkeyPatch.context() as mp:  # an independent decode as the reference
        mp.setattr(Image, "MAX_IMAGE_PIXELS", None)
        ref = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(img.permute(1, 2, 0).numpy(), ref)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_truncated_and_missing_images_advise_the_cli_flag(tmp_path):
    p = tmp_path / "t.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    for path in (p, tmp_path / "missing.png"):
        with pytest.raises(MfdetrError) as e:
            load_image(path, "image id 9")
        assert "--skip-bad" in str(e.value) and "skip_bad=True" not in str(e.value)
