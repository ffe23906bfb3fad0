"""The data side of training: opening caches and checking they fit the model, the DataLoader, and
the decision to hold the caches in RAM (``TrainConfig.preload``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from mfdetr.train.config import TrainConfig
from mfdetr.train.runtime import log
from mfdetr.errors import MfdetrError
from mfdetr.model.config import MaskNetConfig


def open_dataset(cache: Any, what: str = "cache") -> Any:
    """A path/URL -> ``CacheDataset``; an object with ``levels``/``query_dim``/``collate`` passes."""
    if hasattr(cache, "levels") and hasattr(cache, "collate") and hasattr(cache, "__getitem__"):
        return cache
    from mfdetr.cache.reader import CacheDataset

    ds = CacheDataset(cache)
    if len(ds) == 0:
        raise MfdetrError(f"{what} {cache} has no done images; run (or finish) `mfdetr extract` first")
    return ds


def has_targets(ds: Any) -> bool:
    if getattr(ds, "load_targets", True) is False:
        return False
    opts = (getattr(ds, "attrs", None) or {}).get("options") or {}
    return bool(opts.get("targets", True))


def level_dicts(levels: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"name": lv.name, "stride": int(lv.stride), "channels": int(lv.channels)} for lv in levels]


def check_cache_fits(ds: Any, model_cfg: MaskNetConfig, where: str, ckpt: dict[str, Any] | None = None,
                     ckpt_path: Any = None) -> None:
    """Clear errors when a cache's levels / channels / query width do not fit the config or checkpoint."""
    have = {lv.name: lv for lv in ds.levels}
    if model_cfg.levels:
        missing = [n for n in model_cfg.levels if n not in have]
        if missing:
            raise MfdetrError(
                f"the config asks for level(s) {missing} (model.levels = {model_cfg.levels}) but {where} has "
                f"levels {level_dicts(ds.levels)}"
            )
    if ckpt is None:
        return
    for lv in ckpt["levels"]:
        got = have.get(lv["name"])
        if got is None or got.stride != lv["stride"] or got.channels != lv["channels"]:
            raise MfdetrError(
                f"checkpoint {ckpt_path} was trained on level {lv} but {where} has "
                f"{level_dicts([got]) if got else 'no such level'} (cache levels: {level_dicts(ds.levels)})"
            )
    if int(ckpt["query_dim"]) != int(ds.query_dim):
        raise MfdetrError(
            f"checkpoint {ckpt_path} was trained on queries of width {ckpt['query_dim']} but {where} has "
            f"query_dim {ds.query_dim}"
        )


def available_bytes() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def maybe_preload(ds: Any, vds: Any, cfg: TrainConfig, info: Any, progress: bool) -> tuple[Any, Any, int]:
    """Apply ``cfg.preload``: -> (train dataset, val dataset, DataLoader workers for training)."""
    if cfg.preload == "off":
        return ds, vds, cfg.workers
    from mfdetr.cache.memory import estimate_bytes, preload

    need = estimate_bytes(ds) + (estimate_bytes(vds) if vds is not None and info.is_main else 0)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", getattr(info, "world", 1) or 1)))
    budget = min(cfg.preload_max_gb * 2**30 / local, 0.5 * available_bytes() / local)
    if cfg.preload == "auto" and need > budget:
        if info.is_main:
            log(f"train-from-cache: streaming the cache with {cfg.workers} worker(s) (held in RAM it would take "
                 f"{need / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB: preload_max_gb / available memory)")
        return ds, vds, cfg.workers
    t0 = time.perf_counter()
    show = progress and info.is_main
    ds = preload(ds, cfg.workers, show, "preload train cache")
    if vds is not None and info.is_main:
        vds = preload(vds, cfg.workers, show, "preload val cache")
    if info.is_main:
        log(f"train-from-cache: caches held in RAM ({need / 2**30:.2f} GiB, read in {time.perf_counter() - t0:.1f}s); "
             "training reads memory with no workers")
    return ds, vds, 0
