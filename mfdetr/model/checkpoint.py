"""Mask-network checkpoints, the one owner of their format: built by ``build_checkpoint``, written by
``save_checkpoint`` (atomic), read by ``read_checkpoint`` / ``load_mask_net`` / ``checkpoint_detector``.

A checkpoint is one ``torch.save`` dict:

- ``format`` = ``"mfdetr-mask-net"``, ``format_version`` = 2, ``mfdetr_version``;
- ``model_config`` (``MaskNetConfig`` as a dict), ``train_config`` (``TrainConfig`` as a dict);
- ``levels``: the levels the network reads ``[{name, stride, channels}]``; ``query_dim``;
- ``detector``: what rebuilds exactly the detector the cache was made with: ``spec``, ``fingerprint``,
  ``query_dim``, ``levels`` (every level of the cache, in its order), ``topk`` (boxes per image) and
  ``label_map`` (``[[model label id, dataset category id], ...]`` or None when the cache records none);
- ``cache``: ``{fingerprint, path, options, num_images}``; ``dataset``: the cache's dataset dict;
- ``projection``: the train cache's PCA projections (``{level: {mean, basis}}``, packed as the cache
  stores them) or None: evaluate refuses a cache in other bases, predict projects live features
  (absent in v1/v2 checkpoints: neither check nor projection then);
- ``epoch`` (epochs completed), ``step`` (optimizer steps done), ``metrics`` (last epoch's),
  ``best`` (best val mean mask IoU so far), ``world`` (processes);
- ``model`` (state dict), and for resuming ``optimizer``, ``scheduler``, ``scaler``, ``rng``
  (per rank: torch, numpy, python, cuda) and ``sampler`` (seed, next epoch).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mfdetr import __version__
from mfdetr.detectors.base import LevelSpec, level_dicts
from mfdetr.errors import MfdetrError
from mfdetr.model.config import MaskNetConfig
from mfdetr.utils.config import from_dict

FORMAT = "mfdetr-mask-net"
FORMAT_VERSION = 3  # 2: detector.topk and detector.label_map; 3: projection
_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "sampler")


def detector_record(
    cache_attrs: dict[str, Any] | None, levels: Sequence[LevelSpec], query_dim: int
) -> dict[str, Any]:
    """The checkpoint's ``detector`` entry from a cache's ``mfdetr`` attributes (``cache/schema.py``)."""
    attrs = cache_attrs or {}
    det = dict(attrs.get("detector") or {})
    topk = (attrs.get("options") or {}).get("topk")
    label_map = det.get("label_map")
    return {
        "spec": det.get("spec"),
        "fingerprint": det.get("fingerprint"),
        "query_dim": int(query_dim),
        "levels": level_dicts(levels),
        "topk": int(topk) if topk is not None else None,
        "label_map": [[int(k), int(v)] for k, v in label_map] if label_map is not None else None,
    }


def build_checkpoint(
    model: torch.nn.Module,
    *,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    cache_attrs: dict[str, Any] | None,
    cache_levels: Sequence[LevelSpec],
    query_dim: int,
    cache_path: str | None,
    num_images: int,
    progress: dict[str, Any],
    state: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict (see the module doc). ``progress``: epoch, step, best, metrics, world;
    ``state``: optimizer, scheduler, scaler, rng, sampler."""
    attrs = cache_attrs or {}
    ck = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mfdetr_version": __version__,
        "model_config": model_config,
        "train_config": train_config,
        "levels": level_dicts(model.levels),
        "query_dim": int(query_dim),
        "detector": detector_record(attrs, cache_levels, query_dim),
        "cache": {
            "fingerprint": attrs.get("fingerprint"),
            "path": cache_path,
            "options": attrs.get("options"),
            "num_images": int(num_images),
        },
        "dataset": attrs.get("dataset"),
        "projection": (attrs.get("storage") or {}).get("project") or None,
        "model": model.state_dict(),
    }
    for key in ("epoch", "step", "best", "metrics", "world"):
        ck[key] = progress[key]
    for key in ("optimizer", "scheduler", "scaler", "rng", "sampler"):
        ck[key] = state.get(key)
    return ck


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_failed(path: Path, tmp: Path, need: int, e: BaseException) -> MfdetrError:
    """Remove the temp file; a clear error (disk full: with the bytes needed and free)."""
    tmp.unlink(missing_ok=True)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (0 <= free < need)
    if full:
        return MfdetrError(
            f"disk full writing checkpoint {path}: it needs about {need / 2**20:.1f} MiB ({need} bytes), "
            f"{max(free, 0) / 2**20:.1f} MiB free on that filesystem; free space or choose another --out, "
            "then rerun with --resume"
        )
    return MfdetrError(f"cannot write checkpoint {path}: {type(e).__name__}: {e}; check --out")


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash or a full disk never leaves a torn checkpoint, nor
    a ``*.tmp*`` file (disk full and other write errors are MfdetrErrors)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError (iostream error)
        raise _write_failed(path, tmp, _tensor_bytes(ckpt), e) from e
    return path


def copy_checkpoint(src: str | Path, path: str | Path) -> Path:
    """Atomic copy of a written checkpoint file (``last.pt`` / ``best.pt`` from ``epoch_XXX.pt``)."""
    src, path = Path(src), Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, tmp, src.stat().st_size, e) from e
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a mask-network checkpoint dict (clear errors for missing / torn / foreign files)."""
    path = Path(path)
    if not path.is_file():
        raise MfdetrError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated file, not a torch file, ...
        raise MfdetrError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MfdetrError(f"{path} is not an mfdetr mask-network checkpoint (no format={FORMAT!r})")
    version = int(ckpt.get("format_version", 0))
    if version > FORMAT_VERSION or version < 1:
        raise MfdetrError(
            f"{path} has checkpoint format version {version}; this mfdetr reads versions 1 to "
            f"{FORMAT_VERSION}: upgrade mfdetr"
        )
    if version == 1:  # v1 kept top-k only in the cache options and no label map
        ckpt["detector"] = {
            **ckpt["detector"],
            "topk": (ckpt["cache"].get("options") or {}).get("topk"),
            "label_map": None,
        }
    ckpt["format_version"] = FORMAT_VERSION
    return ckpt


def checkpoint_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without its tensors' training state (model, optimizer, ...)."""
    return {k: v for k, v in ckpt.items() if k not in _STATE_KEYS}


def checkpoint_label_map(meta: dict[str, Any]) -> dict[int, int] | None:
    """The detector's label map as ``{model label id: dataset category id}`` (None: the cache had none)."""
    pairs = meta["detector"].get("label_map")
    return None if pairs is None else {int(k): int(v) for k, v in pairs}


def load_mask_net(path: str | Path, map_location: Any = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the mask network of a checkpoint (eval mode, on ``map_location``) and return its meta
    (``checkpoint_meta``: everything but the training state)."""
    from mfdetr.model import build_mask_net

    ckpt = read_checkpoint(path, map_location=map_location)
    cfg = from_dict(MaskNetConfig, ckpt["model_config"])
    model = build_mask_net(
        cfg, [LevelSpec.from_dict(d) for d in ckpt["detector"]["levels"]], int(ckpt["query_dim"])
    )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise MfdetrError(f"checkpoint {path}: its weights do not fit its own model config: {e}") from e
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    model.eval()
    return model, checkpoint_meta(ckpt)
