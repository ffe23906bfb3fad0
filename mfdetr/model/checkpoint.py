"""Mask-network checkpoints: everything to rebuild the model alone, and to resume training exactly.

A checkpoint is one ``torch.save`` dict:

- ``format`` = ``"mfdetr-mask-net"``, ``format_version`` = 1, ``mfdetr_version``;
- ``model_config`` (``MaskNetConfig`` as a dict), ``train_config`` (``TrainConfig`` as a dict);
- ``levels``: the levels the network reads ``[{name, stride, channels}]``; ``query_dim``;
- ``detector``: the cache's detector dict (``spec``, ``fingerprint``, ``query_dim``, ``levels`` = every
  level of the cache, in its order); ``cache``: ``{fingerprint, path, options, num_images}``;
  ``dataset``: the cache's dataset dict (categories included);
- ``epoch`` (epochs completed), ``step`` (optimizer steps done), ``metrics`` (last epoch's),
  ``best`` (best val mean mask IoU so far);
- ``model`` (state dict), and for resuming ``optimizer``, ``scheduler``, ``scaler``, ``rng``
  (per rank: torch, numpy, python, cuda) and ``sampler`` (seed, next epoch).

``load_mask_net(path)`` rebuilds the network from the checkpoint alone (``evaluate`` and ``predict``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError
from mfdetr.model.config import MaskNetConfig
from mfdetr.utils.config import from_dict

FORMAT = "mfdetr-mask-net"
FORMAT_VERSION = 1
_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "sampler")


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a mask-network checkpoint dict (clear errors for missing / foreign files)."""
    path = Path(path)
    if not path.is_file():
        raise MfdetrError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated file, not a torch file, ...
        raise MfdetrError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MfdetrError(f"{path} is not an mfdetr mask-network checkpoint (no format={FORMAT!r})")
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise MfdetrError(
            f"{path} has checkpoint format version {ckpt.get('format_version')}; this mfdetr reads up to "
            f"{FORMAT_VERSION}: upgrade mfdetr"
        )
    return ckpt


def levels_from_dicts(items: list[dict[str, Any]]) -> list[LevelSpec]:
    return [LevelSpec(str(d["name"]), int(d["stride"]), int(d["channels"])) for d in items]


def checkpoint_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without its tensors' training state (model, optimizer, ...)."""
    return {k: v for k, v in ckpt.items() if k not in _STATE_KEYS}


def load_mask_net(path: str | Path, map_location: Any = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the mask network of a checkpoint (eval mode, on ``map_location``) and return its meta.

    The meta dict holds ``model_config``, ``train_config``, ``levels``, ``query_dim``, ``detector``
    (spec, fingerprint, levels of the cache), ``cache``, ``dataset``, ``epoch``, ``step``, ``metrics``.
    """
    from mfdetr.model import build_mask_net

    ckpt = read_checkpoint(path, map_location=map_location)
    cfg = from_dict(MaskNetConfig, ckpt["model_config"])
    all_levels = levels_from_dicts((ckpt.get("detector") or {}).get("levels") or ckpt["levels"])
    model = build_mask_net(cfg, all_levels, int(ckpt["query_dim"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise MfdetrError(f"checkpoint {path}: its weights do not fit its own model config: {e}") from e
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    model.eval()
    return model, checkpoint_meta(ckpt)
