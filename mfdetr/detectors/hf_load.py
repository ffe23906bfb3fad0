"""The supported Hugging Face DETR-family classes (:data:`SUPPORTED`) and loading a local
``save_pretrained`` checkpoint folder (model, image processor, file hashes for the fingerprint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_file

# model_type -> (ForObjectDetection class name, image processor class name, score kind, needs multiple of 32)
SUPPORTED: dict[str, tuple[str, str, str, bool]] = {
    "detr": ("DetrForObjectDetection", "DetrImageProcessor", "softmax", False),
    "conditional_detr": ("ConditionalDetrForObjectDetection", "ConditionalDetrImageProcessor", "sigmoid", False),
    "deformable_detr": ("DeformableDetrForObjectDetection", "DeformableDetrImageProcessor", "sigmoid", False),
    "rt_detr": ("RTDetrForObjectDetection", "RTDetrImageProcessor", "sigmoid", True),
    "rt_detr_v2": ("RTDetrV2ForObjectDetection", "RTDetrImageProcessor", "sigmoid", True),
    "d_fine": ("DFineForObjectDetection", "RTDetrImageProcessor", "sigmoid", True),
}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def supported_classes() -> list[str]:
    return [v[0] for v in SUPPORTED.values()]


def _processor_for(folder: Path, model_type: str):
    import transformers

    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001 - report any loading failure as a user error
            raise MfdetrError(f"{folder}/preprocessor_config.json: cannot load the image processor ({e})") from None
    return getattr(transformers, SUPPORTED[model_type][1])()


def load_hf_folder(folder: str | Path) -> tuple[Any, Any, str]:
    """(model in eval mode, image processor, model_type) from a local checkpoint folder."""
    import transformers
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise MfdetrError(f"hf: checkpoint folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise MfdetrError(f"hf: {folder} has no config.json (expected a save_pretrained folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise MfdetrError(f"hf: {folder}/config.json cannot be read ({e})") from None
    mt = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if mt not in SUPPORTED:
        raise MfdetrError(
            f"hf: {folder}: model type {mt!r} ({arch}) is not supported; supported classes: "
            + ", ".join(supported_classes())
        )
    if arch is not None and arch != SUPPORTED[mt][0]:
        raise MfdetrError(
            f"hf: {folder}: architecture {arch} is not supported (only the object-detection heads are); "
            "supported classes: " + ", ".join(supported_classes())
        )
    bb_type = getattr(getattr(config, "backbone_config", None), "model_type", None)
    if getattr(config, "use_timm_backbone", False) or bb_type == "timm_backbone":
        try:
            import timm  # noqa: F401
        except ImportError:
            raise MfdetrError(
                f"hf: {folder}: the checkpoint uses a timm backbone and timm is not installed: "
                "pip install timm (or save the model with an HF backbone_config, use_timm_backbone=False)"
            ) from None
    if not any(next(folder.glob(g), None) for g in _WEIGHT_GLOBS):
        raise MfdetrError(f"hf: {folder} has no weight file (model.safetensors / pytorch_model.bin)")
    cls = getattr(transformers, SUPPORTED[mt][0])
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise MfdetrError(f"hf: {folder}: cannot load {cls.__name__} ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, _processor_for(folder, mt), mt


def folder_fingerprint_parts(folder: Path) -> dict[str, str]:
    parts = {}
    for g in _WEIGHT_GLOBS:
        for f in sorted(folder.glob(g)):
            parts[f.name] = sha256_file(f)
    for name in ("config.json", "preprocessor_config.json", "generation_config.json"):
        if (folder / name).is_file():
            parts[name] = sha256_file(folder / name)
    return parts
