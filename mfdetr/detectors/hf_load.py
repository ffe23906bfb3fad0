"""Loading a local Hugging Face ``save_pretrained`` checkpoint folder for the ``hf:`` adapter: the model class
(any object-detection head of the installed transformers, found through its auto mappings, not a hand list),
the image processor, and the file hashes for the fingerprint.

Whether a loaded model has what the mask network needs (per-query decoder states, logits, boxes, feature
maps) is checked on a probe forward by the adapter (``hf.py``), with an error naming what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_file

# The DETR-family classes this adapter is tested with (tests/hf_tiny.py builds a tiny one of each); any other
# object-detection head with the same outputs loads too.
TESTED_CLASSES = (
    "DetrForObjectDetection",
    "ConditionalDetrForObjectDetection",
    "DabDetrForObjectDetection",
    "TableTransformerForObjectDetection",
    "DeformableDetrForObjectDetection",
    "RTDetrForObjectDetection",
    "RTDetrV2ForObjectDetection",
    "DFineForObjectDetection",
    "Deimv2ForObjectDetection",
    "LwDetrForObjectDetection",
    "RfDetrForObjectDetection",
    "RfDetrForInstanceSegmentation",
)
# image processor for a folder without preprocessor_config.json, where transformers' auto mapping has none
_PROCESSOR_GAPS = {
    "dab-detr": "ConditionalDetrImageProcessor",
    "d_fine": "RTDetrImageProcessor",
    "rt_detr_v2": "RTDetrImageProcessor",
}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def supported_classes() -> list[str]:
    return list(TESTED_CLASSES)


def _detection_heads() -> tuple[dict[str, str], set[str]]:
    """(model_type -> object-detection class, every accepted head class): the object-detection heads of the
    installed transformers, plus instance-segmentation heads of the same model types
    (RfDetrForInstanceSegmentation: its box outputs are a detector's)."""
    from transformers.models.auto import modeling_auto as ma

    det = dict(ma.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES)
    seg = {v for k, v in ma.MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES.items() if k in det}
    return det, set(det.values()) | seg


def _unsupported(folder: Path, what: str) -> MfdetrError:
    return MfdetrError(
        f"hf: {folder}: {what} is not supported: the hf: adapter loads the object-detection heads of "
        f"transformers (DETR family); tested classes: {', '.join(supported_classes())}"
    )


def _model_class(folder: Path, config):
    import transformers

    mt = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [None])[0]
    det, accepted = _detection_heads()
    if mt not in det:
        return None, _unsupported(folder, f"model type {mt!r} ({arch})")
    name = arch or det[mt]
    if name not in accepted:
        return None, _unsupported(folder, f"architecture {name} (not an object-detection head)")
    cls = getattr(transformers, name, None)
    if cls is None:
        return None, MfdetrError(f"hf: {folder}: transformers {transformers.__version__} has no class {name}")
    return cls, None


def _processor_for(folder: Path, model_type: str):
    import transformers

    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001 - report any loading failure as a user error
            msg = f"{folder}/preprocessor_config.json: cannot load the image processor ({e})"
            raise MfdetrError(msg) from None
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    name = names.get("torchvision") or next(iter(names.values())) if isinstance(names, dict) else names
    name = name or _PROCESSOR_GAPS.get(model_type)
    if not name or getattr(transformers, name, None) is None:
        raise MfdetrError(
            f"hf: {folder} has no preprocessor_config.json and transformers knows no default image processor "
            f"for {model_type!r}: save the checkpoint's processor there (processor.save_pretrained(folder))"
        )
    return getattr(transformers, name)()


def _check_timm(folder: Path, config) -> None:
    bb_type = getattr(getattr(config, "backbone_config", None), "model_type", None)
    if getattr(config, "use_timm_backbone", False) or bb_type == "timm_backbone":
        try:
            import timm  # noqa: F401
        except ImportError:
            raise MfdetrError(
                f"hf: {folder}: the checkpoint uses a timm backbone and timm is not installed: "
                "pip install timm (or save the model with an HF backbone_config, use_timm_backbone=False)"
            ) from None


def load_hf_folder(folder: str | Path) -> tuple[Any, Any, str]:
    """(model in eval mode, image processor, model_type) from a local checkpoint folder."""
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
    cls, err = _model_class(folder, config)
    if err is not None:
        raise err
    _check_timm(folder, config)
    if not any(next(folder.glob(g), None) for g in _WEIGHT_GLOBS):
        raise MfdetrError(f"hf: {folder} has no weight file (model.safetensors / pytorch_model.bin)")
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
    model.eval()  # eval: one query group (LW-DETR / RF-DETR train with group_detr groups), no dropout
    for p in model.parameters():
        p.requires_grad_(False)
    return model, _processor_for(folder, config.model_type), config.model_type


def folder_fingerprint_parts(folder: Path) -> dict[str, str]:
    parts = {}
    for g in _WEIGHT_GLOBS:
        for f in sorted(folder.glob(g)):
            parts[f.name] = sha256_file(f)
    for name in ("config.json", "preprocessor_config.json", "generation_config.json"):
        if (folder / name).is_file():
            parts[name] = sha256_file(folder / name)
    return parts
