"""Detector specs -> :class:`~mfdetr.detectors.base.FrozenDetector`.

Specs:
    ``hf:PATH``            a local Hugging Face checkpoint folder (``save_pretrained``: config.json + weights,
                           preprocessor_config.json when present); classes: ``mfdetr.detectors.hf.SUPPORTED``.
    ``shapes``             the shipped detector (``mfdetr/detectors/weights/shapes``) through the same ``hf:`` adapter.
    ``py:module:function`` a user factory returning a FrozenDetector; it is called with the keyword arguments
                           among (categories, device, levels, topk, label_map) that its signature accepts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mfdetr.detectors.base import FrozenDetector, LevelSpec
from mfdetr.detectors.pixels import PixelLevels, split_pixel_levels
from mfdetr.errors import MfdetrError

SHAPES_DIR = Path(__file__).resolve().parent / "weights" / "shapes"
SPEC_FORMS = ("hf:PATH", "shapes", "py:module:function")
REPRODUCE_SHAPES = "python tools/train_shapes_detector.py   (about 1 h on a 2-core CPU; see its docstring)"


def supported_specs() -> str:
    from mfdetr.detectors.hf_load import supported_classes

    return f"specs: {', '.join(SPEC_FORMS)}; hf: classes: {', '.join(supported_classes())}"


def shapes_available() -> bool:
    return (SHAPES_DIR / "config.json").is_file() and (SHAPES_DIR / "model.safetensors").is_file()


def build_detector(
    spec: str,
    categories: Sequence[dict[str, Any]] | None = None,
    device: str | torch.device = "cpu",
    levels: Sequence[str] | None = None,
    topk: int = 100,
    label_map: str | Path | dict | None = None,
) -> FrozenDetector:
    """Build the frozen detector named by ``spec`` (see the module docstring).

    categories: the dataset's COCO categories ``[{id, name}, ...]``: labels come back as these ids (mapped by name
        from the checkpoint's id2label, or by ``label_map``); ``None`` = the model's own label ids.
    levels: feature level names to return (``None`` = the detector's default: stride-4 backbone + encoder levels).
    topk: boxes kept per image (top-k over query x class).
    label_map: JSON file or dict ``{model_label_id: dataset_category_id}``; unmapped classes are dropped.

    Level names ``pxN`` in ``levels`` add the network-input image at stride N
    (:mod:`mfdetr.detectors.pixels`) to any detector's outputs.
    """
    own, pixels = split_pixel_levels(levels)
    det = _build(spec, categories, device, own, topk, label_map)
    return PixelLevels(det, pixels) if pixels else det


def _build(
    spec: str,
    categories: Sequence[dict[str, Any]] | None,
    device: str | torch.device,
    levels: Sequence[str] | None,
    topk: int,
    label_map: str | Path | dict | None,
) -> FrozenDetector:
    if not isinstance(spec, str) or not spec.strip():
        raise MfdetrError(f"empty detector spec; {supported_specs()}")
    spec = spec.strip()
    if spec.startswith("hf:"):
        from mfdetr.detectors.hf import build_hf_detector

        path = spec[3:]
        if not path:
            raise MfdetrError("hf: spec needs a folder: hf:PATH")
        return build_hf_detector(
            Path(path).expanduser(),
            spec=spec,
            categories=categories,
            device=device,
            levels=levels,
            topk=topk,
            label_map=label_map,
        )
    if spec == "shapes":
        if not shapes_available():
            raise MfdetrError(
                f"the shipped 'shapes' detector weights are missing from {SHAPES_DIR} "
                f"(config.json + model.safetensors); reproduce them with: {REPRODUCE_SHAPES}"
            )
        from mfdetr.detectors.hf import build_hf_detector

        return build_hf_detector(
            SHAPES_DIR,
            spec="shapes",
            categories=categories,
            device=device,
            levels=levels,
            topk=topk,
            label_map=label_map,
        )
    if spec.startswith("py:"):
        return _build_py(
            spec, categories=categories, device=device, levels=levels, topk=topk, label_map=label_map
        )
    raise MfdetrError(f"unknown detector spec {spec!r}; {supported_specs()}")


def _build_py(spec: str, **kwargs: Any) -> FrozenDetector:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise MfdetrError(f"bad spec {spec!r}: expected py:module:function (e.g. py:my_pkg.detectors:build)")
    mod_name, fn_name = parts[1], parts[2]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise MfdetrError(f"{spec}: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise MfdetrError(f"{spec}: module {mod_name!r} has no callable {fn_name!r}")
    try:
        sig = inspect.signature(fn)
        takes_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        call = {k: v for k, v in kwargs.items() if takes_var or k in sig.parameters}
    except (TypeError, ValueError):
        call = {}
    det = fn(**call)
    _validate(det, spec)
    if getattr(det, "spec", None) != spec:
        try:
            det.spec = spec
        except AttributeError:
            pass
    return det


def _validate(det: Any, spec: str) -> None:
    """Check that a factory's result satisfies the FrozenDetector protocol."""
    need = ["spec", "levels", "query_dim", "fingerprint", "device", "detect", "input_size", "to"]
    missing = [n for n in need if not hasattr(det, n)]
    if missing or not isinstance(det, FrozenDetector):
        raise MfdetrError(
            f"{spec}: the factory returned {type(det).__name__}, which is not a FrozenDetector "
            f"(missing: {', '.join(missing) or 'n/a'}; see mfdetr/detectors/base.py)"
        )
    for name in ("detect", "input_size", "to"):
        if not callable(getattr(det, name)):
            raise MfdetrError(f"{spec}: {type(det).__name__}.{name} must be callable")
    lv = det.levels
    if not isinstance(lv, (list, tuple)) or not lv or not all(isinstance(x, LevelSpec) for x in lv):
        raise MfdetrError(f"{spec}: .levels must be a non-empty list of LevelSpec, got {lv!r}")
    names = [x.name for x in lv]
    if len(set(names)) != len(names):
        raise MfdetrError(f"{spec}: duplicate level names {names}")
    for x in lv:
        if not (
            isinstance(x.stride, int) and x.stride >= 1 and isinstance(x.channels, int) and x.channels >= 1
        ):
            raise MfdetrError(f"{spec}: level {x} needs a positive int stride and channel count")
    if not isinstance(det.query_dim, int) or det.query_dim < 1:
        raise MfdetrError(f"{spec}: .query_dim must be a positive int, got {det.query_dim!r}")
    if not isinstance(det.fingerprint, str) or not det.fingerprint:
        raise MfdetrError(f"{spec}: .fingerprint must be a non-empty string")
