"""The data side of training: opening caches and checking they fit the model, the DataLoader, and
the decision to hold the caches in RAM (``TrainConfig.preload``)."""

from __future__ import annotations

import time
from typing import Any

from mfdetr.cache.storage import check_same_projection, projection_id
from mfdetr.detectors.base import level_dicts
from mfdetr.errors import MfdetrError
from mfdetr.model.config import MaskNetConfig
from mfdetr.train.config import TrainConfig
from mfdetr.train.runtime import log
from mfdetr.utils.distributed import torchrun_env


def open_dataset(
    cache: Any, what: str = "cache", allow_partial: bool = False, skip_damaged: bool = False
) -> Any:
    """A path/URL -> ``CacheDataset``; an object with ``levels``/``query_dim``/``collate`` passes.

    A cache an extract has not finished (done < num_images) is refused unless ``allow_partial`` (then
    a loud warning); ``skip_damaged`` goes to the reader when it supports it."""
    if hasattr(cache, "levels") and hasattr(cache, "collate") and hasattr(cache, "__getitem__"):
        return cache
    import inspect

    from mfdetr.cache.reader import CacheDataset

    kw = (
        {"skip_damaged": True}
        if skip_damaged and "skip_damaged" in inspect.signature(CacheDataset).parameters
        else {}
    )
    if skip_damaged and not kw:
        log(
            f"warning: this cache reader cannot skip damaged records; --skip-damaged has no effect on {cache}"
        )
    ds = CacheDataset(cache, **kw)
    skipped = getattr(ds, "skipped_blocks", None)
    if skipped:
        log(
            f"WARNING: {what} {cache}: --skip-damaged: skipping {len(skipped)} damaged block(s) {skipped}; "
            f"training on the other {len(ds)} images (`mfdetr cache verify {cache}` lists the damage)"
        )
    done, total = done_count(ds), int(ds.num_images)
    if done < total:
        msg = (
            f"{what} {cache} is not complete: {done} of {total} images done (an extract is still writing it, "
            "or was interrupted)"
        )
        if not allow_partial:
            raise MfdetrError(
                msg + "; finish it (rerun the same `mfdetr extract`), or pass --allow-partial to "
                f"train on the {done} done images"
            )
        log(f"WARNING: {msg}; --allow-partial: training on the {len(ds)} done images only")
    if len(ds) == 0:
        raise MfdetrError(f"{what} {cache} has no done images; run (or finish) `mfdetr extract` first")
    return ds


def done_count(ds: Any) -> int:
    """Images an extract has finished (done flags set, bad images included; blocks the reader skips as
    damaged count as finished: they are damage, reported by the reader, not an unfinished extract)."""
    import numpy as np

    from mfdetr.cache.reader import open_cache

    done = np.asarray(open_cache(ds.path)["done"][:], dtype=bool)
    block = int(ds.attrs["options"]["block"])
    for b in getattr(ds, "skipped_blocks", None) or []:
        done[b * block : (b + 1) * block] = True
    return int(np.count_nonzero(done))


def open_caches(cache: Any, val_cache: Any, cfg: TrainConfig) -> tuple[Any, Any]:
    """The train and val datasets, checked: mask targets, levels the config asks for, matching widths."""
    ds = open_dataset(cache, "train cache", cfg.allow_partial, cfg.skip_damaged)
    if not has_targets(ds):
        raise MfdetrError(f"train cache {cache} has no mask targets (extracted without annotations?)")
    check_cache_fits(ds, cfg.model, f"train cache {cache}")
    if val_cache is None:
        return ds, None
    vds = open_dataset(val_cache, "val cache", cfg.allow_partial, cfg.skip_damaged)
    check_cache_fits(vds, cfg.model, f"val cache {val_cache}")
    if level_dicts(vds.levels) != level_dicts(ds.levels) or vds.query_dim != ds.query_dim:
        raise MfdetrError(
            f"val cache {val_cache} (levels {level_dicts(vds.levels)}, query_dim {vds.query_dim}) does not "
            f"match train cache {cache} (levels {level_dicts(ds.levels)}, query_dim {ds.query_dim})"
        )
    train_storage = (getattr(ds, "attrs", None) or {}).get("storage")
    check_same_projection(
        projection_id(train_storage),
        (getattr(vds, "attrs", None) or {}).get("storage"),
        f"val cache {val_cache}",
        f"train cache {cache}",
    )
    return ds, vds


def has_targets(ds: Any) -> bool:
    if getattr(ds, "load_targets", True) is False:
        return False
    opts = (getattr(ds, "attrs", None) or {}).get("options") or {}
    return bool(opts.get("targets", True))


def check_cache_fits(
    ds: Any, model_cfg: MaskNetConfig, where: str, ckpt: dict[str, Any] | None = None, ckpt_path: Any = None
) -> None:
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


def maybe_preload(
    ds: Any, vds: Any, cfg: TrainConfig, info: Any, progress: bool, workers: int
) -> tuple[Any, Any, int]:
    """Apply ``cfg.preload``: -> (train dataset, val dataset, DataLoader workers for training)."""
    if cfg.preload == "off":
        return ds, vds, workers
    from mfdetr.cache.memory import estimate_bytes, preload

    need = estimate_bytes(ds) + (estimate_bytes(vds) if vds is not None and info.is_main else 0)
    local = torchrun_env().local_world
    budget = min(cfg.preload_max_gb * 2**30 / local, 0.5 * available_bytes() / local)
    if cfg.preload == "auto" and need > budget:
        if info.is_main:
            log(
                f"train-from-cache: streaming the cache with {workers} worker(s) (held in RAM it would take "
                f"{need / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB: preload_max_gb / available memory)"
            )
        return ds, vds, workers
    t0 = time.perf_counter()
    show = progress and info.is_main
    ds = preload(ds, workers, show, "preload train cache")
    if vds is not None and info.is_main:
        vds = preload(vds, workers, show, "preload val cache")
    if info.is_main:
        log(
            f"train-from-cache: caches held in RAM ({need / 2**30:.2f} GiB, read in "
            f"{time.perf_counter() - t0:.1f}s); training reads memory with no workers"
        )
    return ds, vds, 0
