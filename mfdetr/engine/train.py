"""Stage two: train the mask network from a cache (``mfdetr train-from-cache``).

``train_from_cache(cache, out, cfg)`` reads records from a ``CacheDataset`` (features, boxes, queries,
matched mask targets), never a detector, an image or an annotation file. Per step: sample up to
``max_boxes_per_image`` matched boxes (+ a few unmatched ones for the mask-IoU head) of each image,
run the mask network on them, point-sampled BCE + dice + IoU regression, AdamW with warmup then cosine
or step decay and gradient clipping (AMP bf16/fp16 on CUDA).

Run directory ``out``:
    checkpoints/epoch_XXX.pt   every epoch (XXX = epochs completed, 1-based)
    checkpoints/last.pt        the latest epoch
    checkpoints/best.pt        best val mean mask IoU (the latest epoch when there is no val cache)
    metrics.jsonl              {"type": "step"|"epoch"|"resume"|"start", ...} one JSON per line
    train_config.json          the full TrainConfig of the run

Exact resume: the sampler is a ``DistributedSampler`` seeded with ``seed`` and reshuffled with
``set_epoch`` (a pure function of seed and epoch), every random draw of a step comes from the global
torch RNG, and an epoch checkpoint holds the model, optimizer, scheduler, scaler and the torch /
numpy / python (/ CUDA) RNG states of every rank; so ``--resume`` from epoch e replays epochs e+1...
exactly as the uninterrupted run (same loss sequence, same final weights; on CPU, bitwise).

DDP: launched by ``torchrun`` (``WORLD_SIZE > 1``): gloo on CPU, NCCL on GPU, the same sampler
sharded by rank; rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from mfdetr import __version__
from mfdetr.cache.batch import batch_to
from mfdetr.engine import distributed as dist_utils
from mfdetr.engine.schedule import build_scheduler
from mfdetr.errors import MfdetrError
from mfdetr.model.checkpoint import FORMAT, FORMAT_VERSION, read_checkpoint, save_checkpoint
from mfdetr.model.config import LossConfig, MaskNetConfig
from mfdetr.model.losses import compute_losses, mask_iou
from mfdetr.utils.config import to_dict


@dataclass
class TrainConfig:
    """Training of the mask network from a cache (TOML table ``[train]`` in a pipeline).

    model / loss: the network (``MaskNetConfig``) and its losses (``LossConfig``).
    epochs: passes over the train cache. batch_size: images per step (per process under DDP).
    lr / weight_decay: AdamW (no decay on biases, norms and embeddings).
    warmup_iters: linear warmup steps. schedule: ``cosine`` (to ``min_lr_ratio`` x lr) or ``step``
        (x ``step_gamma`` at each fraction of the run in ``step_milestones``).
    grad_clip: max global gradient norm (0 = off).
    amp: ``off`` | ``bf16`` | ``fp16`` autocast (CUDA; bf16 also allowed on CPU, fp16 is not).
    workers: DataLoader worker processes. device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
    threads: torch CPU threads of the training process (0 = auto: on CPU the cores per process left
        after the DataLoader workers, at least 1; see ``compute_threads``).
    seed: seeds the model init, the sampler and every random draw (boxes and points per step).
    log_every: steps between ``metrics.jsonl`` step records and bar updates.
    max_boxes_per_image: matched boxes per image that get a mask loss per step, sampled at random
        (0 = all); bounds the per-step cost on crowded images.
    val_batch_size / val_max_images: validation batch size and image cap (0 = all val images).
    preload: hold the decoded caches in RAM (``mfdetr/cache/memory.py``): read once by ``workers``
        processes, then training indexes memory with no workers and every core goes to the step
        (1.6x faster steps on the 2-core reference machine; results identical). ``auto``: when the
        train + val caches take at most ``preload_max_gb`` GiB (per local process) and half the
        available memory; ``on``: always; ``off``: stream from the store with ``workers``.
    val_max_boxes_per_image: matched boxes validated per image, one per object first (its best-
        scored box), 0 = all. Top-k over query x class yields ~9 boxes per object on the shapes
        caches; 8 per image measured the same mean IoU as all of them (0.835 vs 0.834) at 1/3 the
        cost (9 s instead of 28 s of CPU for 300 images).
    """

    model: MaskNetConfig = field(default_factory=MaskNetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 4
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_iters: int = 100
    schedule: Literal["cosine", "step"] = "cosine"
    min_lr_ratio: float = 0.01
    step_milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])
    step_gamma: float = 0.1
    grad_clip: float = 1.0
    amp: Literal["off", "bf16", "fp16"] = "off"
    workers: int = 2
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    log_every: int = 20
    max_boxes_per_image: int = 4
    val_batch_size: int = 16
    val_max_images: int = 0
    val_max_boxes_per_image: int = 8
    preload: Literal["auto", "on", "off"] = "auto"
    preload_max_gb: float = 4.0


# ------------------------------------------------------------------------------------------ helpers
def _log(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except Exception:  # pragma: no cover
        print(msg, file=sys.stderr)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available (``cuda:local_rank``), else CPU; explicit names are checked."""
    if name in ("", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MfdetrError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def autocast_ctx(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` (``off`` -> no-op)."""
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise MfdetrError("amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def compute_threads(cfg: TrainConfig, device: torch.device, info: Any = None, workers: int | None = None) -> int:
    """torch intra-op threads of a training process.

    ``cfg.threads`` when set; else on CPU the cores left after the DataLoader workers, split among
    the local DDP processes (at least 1): OpenMP teams that share cores with worker processes (or
    with each other) stall on every small op -- measured here, 2 threads + 2 workers on 2 cores ran
    a step 6x slower than 1 thread + 1 worker. On CUDA: torch's default.
    """
    if cfg.threads > 0:
        return cfg.threads
    if device.type != "cpu":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", getattr(info, "world", 1) or 1)))
    return max(1, cores // local - (cfg.workers if workers is None else workers))


def _available_bytes() -> float:
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
    budget = min(cfg.preload_max_gb * 2**30 / local, 0.5 * _available_bytes() / local)
    if cfg.preload == "auto" and need > budget:
        if info.is_main:
            _log(f"train-from-cache: streaming the cache with {cfg.workers} worker(s) (held in RAM it would take "
                 f"{need / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB: preload_max_gb / available memory)")
        return ds, vds, cfg.workers
    t0 = time.perf_counter()
    show = progress and info.is_main
    ds = preload(ds, cfg.workers, show, "preload train cache")
    if vds is not None and info.is_main:
        vds = preload(vds, cfg.workers, show, "preload val cache")
    if info.is_main:
        _log(f"train-from-cache: caches held in RAM ({need / 2**30:.2f} GiB, read in {time.perf_counter() - t0:.1f}s); "
             "training reads memory with no workers")
    return ds, vds, 0


def open_dataset(cache: Any, what: str = "cache") -> Any:
    """A path/URL -> ``CacheDataset``; an object with ``levels``/``query_dim``/``collate`` passes."""
    if hasattr(cache, "levels") and hasattr(cache, "collate") and hasattr(cache, "__getitem__"):
        return cache
    from mfdetr.cache.reader import CacheDataset

    ds = CacheDataset(cache)
    if len(ds) == 0:
        raise MfdetrError(f"{what} {cache} has no done images; run (or finish) `mfdetr extract` first")
    return ds


def _has_targets(ds: Any) -> bool:
    if getattr(ds, "load_targets", True) is False:
        return False
    opts = (getattr(ds, "attrs", None) or {}).get("options") or {}
    return bool(opts.get("targets", True))


def _level_dicts(levels: Iterable[Any]) -> list[dict[str, Any]]:
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
                f"levels {_level_dicts(ds.levels)}"
            )
    if ckpt is None:
        return
    for lv in ckpt["levels"]:
        got = have.get(lv["name"])
        if got is None or got.stride != lv["stride"] or got.channels != lv["channels"]:
            raise MfdetrError(
                f"checkpoint {ckpt_path} was trained on level {lv} but {where} has "
                f"{_level_dicts([got]) if got else 'no such level'} (cache levels: {_level_dicts(ds.levels)})"
            )
    if int(ckpt["query_dim"]) != int(ds.query_dim):
        raise MfdetrError(
            f"checkpoint {ckpt_path} was trained on queries of width {ckpt['query_dim']} but {where} has "
            f"query_dim {ds.query_dim}"
        )


def train_select(batch: dict[str, Any], max_matched: int, n_unmatched: int) -> torch.Tensor:
    """Boxes a step trains on, ``[B, K]`` bool: up to ``max_matched`` matched boxes per image (random,
    0 = all) and up to ``n_unmatched`` unmatched valid ones (for the IoU head's target 0).

    Distinct objects first: with one-to-many matching (and top-k over query x class, where one query
    shows up under several labels) an object can own many boxes; the cap takes one box of every
    matched annotation (at random) before a second box of any. Draws from the global torch RNG
    (saved in checkpoints: exact resume). Never empty: an image batch without any valid box selects
    its first row (a zero box; its loss weight is 0).
    """
    valid = batch["valid"]
    ann = batch["match_ann_id"]
    matched = valid & (ann >= 0)
    prio = torch.rand(valid.shape, device=valid.device)
    if max_matched > 0:
        same = (ann[:, :, None] == ann[:, None, :]) & matched[:, :, None] & matched[:, None, :]
        rank = (same & (prio[:, None, :] > prio[:, :, None])).sum(-1)  # same-object boxes drawn before
        sel = _top_per_row(matched, prio - rank.to(prio.dtype), max_matched)
    else:
        sel = matched.clone()
    if n_unmatched > 0:
        sel |= _top_per_row(valid & ~matched, prio, n_unmatched)
    if not bool(sel.any()):
        if bool(valid.any()):
            sel = valid.clone()
        else:
            sel = torch.zeros_like(valid)
            sel[0, 0] = True
    return sel


def _top_per_row(mask: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0:
        return mask.clone()
    score = torch.where(mask, score, torch.full_like(score, -1e9))
    k = min(n, mask.shape[1])
    idx = score.topk(k, dim=1).indices
    out = torch.zeros_like(mask)
    out.scatter_(1, idx, True)
    return out & mask


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("level_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(ds: Any, batch_size: int, workers: int, sampler: Any = None, shuffle: bool = False,
                drop_last: bool = False, seed: int = 0, pin_memory: bool = False, collate_fn: Any = None,
                persistent: bool = True) -> DataLoader:
    """A DataLoader over cache records (collate = the dataset's unless ``collate_fn``), workers
    started by forkserver (kept across epochs when ``persistent``)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        import multiprocessing as mp

        kw = {
            "multiprocessing_context": "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn",
            "persistent_workers": persistent,
            "prefetch_factor": 4,
            "worker_init_fn": _worker_init,
        }
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=workers,
        collate_fn=collate_fn or ds.collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),  # worker seeds: never touches the global RNG
        **kw,
    )


# ----------------------------------------------------------------------------------- validation
def val_select(batch: dict[str, Any], max_boxes: int = 0) -> torch.Tensor:
    """Matched boxes to validate, ``[B, K]`` bool: all (``max_boxes`` 0), or per image up to
    ``max_boxes``, one box per matched object first (its highest-scoring box), then the next best
    boxes -- deterministic. Top-k over query x class gives ~9 boxes per object here; the best-scored
    box of each object is what AP mostly sees."""
    matched = batch["valid"] & (batch["match_ann_id"] >= 0)
    if max_boxes <= 0:
        return matched
    ann, score = batch["match_ann_id"], batch["scores"].float()
    same = (ann[:, :, None] == ann[:, None, :]) & matched[:, :, None] & matched[:, None, :]
    k = ann.shape[1]
    idx = torch.arange(k, device=ann.device)
    better = (score[:, None, :] > score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & (idx[None, :] < idx[:, None])[None])
    rank = (same & better).sum(-1)
    return _top_per_row(matched, score.clamp(0, 1) * 0.5 - rank.to(score.dtype), max_boxes)


@torch.no_grad()
def validate(model: torch.nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, amp: str = "off",
             max_images: int = 0, max_boxes: int = 0) -> dict[str, float]:
    """Mean mask IoU of the matched boxes (mask > 0.5 vs the cached crop, at the crop's resolution),
    and the IoU head's mean absolute error on them; ``max_boxes``: see ``val_select``."""
    was_training = model.training
    model.eval()
    inter_sum, n, err_sum, images = 0.0, 0, 0.0, 0
    for batch in loader:
        batch = batch_to(batch, device)
        select = val_select(batch, max_boxes)
        if bool(select.any()):
            with autocast_ctx(device, amp):
                out = model(batch, select)
            rows = out["rows"]
            targets = batch["mask_targets"][rows[:, 0], rows[:, 1]]
            iou = mask_iou(out["mask_logits"].float(), targets)
            inter_sum += float(iou.sum())
            err_sum += float((out["iou_pred"].float() - iou).abs().sum())
            n += int(iou.numel())
        images += int(batch["valid"].shape[0])
        if max_images and images >= max_images:
            break
    model.train(was_training)
    return {
        "val_miou": inter_sum / max(n, 1),
        "val_iou_head_mae": err_sum / max(n, 1),
        "val_boxes": float(n),
        "val_images": float(images),
    }


# ---------------------------------------------------------------------------------------- train
def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_from_cache(
    cache: Any,
    out: str | Path,
    cfg: TrainConfig | None = None,
    val_cache: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the mask network on ``cache`` (path, URL or CacheDataset) into run directory ``out``.

    ``resume``: continue from ``out/checkpoints/last.pt`` (exactly; see the module doc); without
    it an existing run directory with checkpoints is an error (never silently overwritten).
    Returns a summary: run_dir, checkpoint, best_checkpoint, epochs, steps, train_loss, val_miou,
    best_val_miou, seconds, images_per_s, params, losses (per step, this call), resumed_from.
    """
    from mfdetr.model.mask_net import build_mask_net, count_parameters

    cfg = cfg or TrainConfig()
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    t_start = time.perf_counter()

    prev_threads = torch.get_num_threads()
    device0 = resolve_device(cfg.device)
    info = dist_utils.init_distributed(device0)
    device = resolve_device(cfg.device, info.local_rank) if device0.type == "cuda" else device0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(compute_threads(cfg, device, info))
    if cfg.amp == "fp16" and device.type != "cuda":
        raise MfdetrError("amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    if cfg.batch_size < 1 or cfg.epochs < 0:
        raise MfdetrError(f"batch size must be >= 1 and epochs >= 0 (got {cfg.batch_size}, {cfg.epochs})")

    try:
        ds = open_dataset(cache, "train cache")
        if not _has_targets(ds):
            raise MfdetrError(f"train cache {cache} has no mask targets (extracted without annotations?)")
        check_cache_fits(ds, cfg.model, f"train cache {cache}")
        vds = open_dataset(val_cache, "val cache") if val_cache is not None else None
        if vds is not None:
            check_cache_fits(vds, cfg.model, f"val cache {val_cache}")
            if _level_dicts(vds.levels) != _level_dicts(ds.levels) or vds.query_dim != ds.query_dim:
                raise MfdetrError(
                    f"val cache {val_cache} (levels {_level_dicts(vds.levels)}, query_dim {vds.query_dim}) does not "
                    f"match train cache {cache} (levels {_level_dicts(ds.levels)}, query_dim {ds.query_dim})"
                )

        # ---- resume or fresh
        ckpt = None
        last = ckpt_dir / "last.pt"
        if resume:
            if not last.is_file():
                raise MfdetrError(f"--resume: no checkpoint at {last}; start without --resume")
            ckpt = read_checkpoint(last)
            check_cache_fits(ds, cfg.model, f"train cache {cache}", ckpt, last)
            if ckpt["model_config"] != to_dict(cfg.model):
                raise MfdetrError(
                    f"--resume: the model config differs from the checkpoint's ({last}): checkpoint "
                    f"{ckpt['model_config']} vs now {to_dict(cfg.model)}"
                )
            fp_ck = (ckpt.get("cache") or {}).get("fingerprint")
            if fp_ck and getattr(ds, "fingerprint", None) and fp_ck != ds.fingerprint:
                raise MfdetrError(
                    f"--resume: checkpoint {last} was trained on cache fingerprint {fp_ck[:12]} but {cache} has "
                    f"fingerprint {str(ds.fingerprint)[:12]}"
                )
        elif any(ckpt_dir.glob("*.pt")):  # every rank sees the same run dir: all raise, none hangs
            raise MfdetrError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        dist_utils.barrier(info)
        ds, vds, workers = maybe_preload(ds, vds, cfg, info, progress)
        torch.set_num_threads(compute_threads(cfg, device, info, workers))

        _seed_all(cfg.seed)
        model = build_mask_net(cfg.model, ds.levels, ds.query_dim).to(device)
        n_params = count_parameters(model)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), foreach=True)

        sampler = DistributedSampler(ds, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg.seed)
        per_rank = len(sampler)
        drop_last = per_rank >= cfg.batch_size
        loader = make_loader(ds, cfg.batch_size, workers, sampler=sampler, drop_last=drop_last, seed=cfg.seed,
                             pin_memory=device.type == "cuda")
        iters_per_epoch = len(loader)
        if iters_per_epoch == 0:
            raise MfdetrError(f"train cache {cache} has no images for this process")
        total_iters = iters_per_epoch * cfg.epochs
        scheduler = build_scheduler(optimizer, total_iters, min(cfg.warmup_iters, max(total_iters // 4, 1)),
                                    cfg.schedule, cfg.min_lr_ratio, cfg.step_milestones, cfg.step_gamma)
        scaler = torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16"))
        val_loader = None
        if vds is not None and info.is_main:
            val_loader = make_loader(vds, cfg.val_batch_size, min(workers, 2), seed=cfg.seed,
                                     pin_memory=device.type == "cuda")

        start_epoch, step, best = 0, 0, -1.0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            rngs = ckpt["rng"]
            if len(rngs) == info.world:
                _set_rng_state(rngs[info.rank])
                rng_note = f"RNG states of {len(rngs)} rank(s) (torch, numpy, python{', cuda' if 'cuda' in rngs[0] else ''})"
            else:
                _set_rng_state(rngs[0])
                rng_note = f"RNG of rank 0 only (checkpoint from {len(rngs)} ranks, now {info.world}: not exact)"
            start_epoch, step, best = int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt.get("best", -1.0))
            if info.is_main:
                msg = (
                    f"resumed from {last}: {start_epoch}/{cfg.epochs} epochs done, step {step}, restored model, "
                    f"optimizer, scheduler (lr {scheduler.get_last_lr()[0]:.3g}), "
                    f"{'grad scaler, ' if ckpt.get('scaler') else ''}{rng_note}, sampler seed "
                    f"{ckpt['sampler']['seed']} -> next epoch {start_epoch}"
                )
                _log(msg)
                _append_jsonl(out / "metrics.jsonl", {"type": "resume", "epoch": start_epoch, "step": step, "message": msg})

        if info.enabled:
            ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
            net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model, **ddp_kw)
        else:
            net = model

        metrics_path = out / "metrics.jsonl"
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            _append_jsonl(metrics_path, {
                "type": "start", "time": time.time(), "epochs": cfg.epochs, "start_epoch": start_epoch,
                "iters_per_epoch": iters_per_epoch, "world": info.world, "device": str(device),
                "params": n_params, "train_images": len(ds),
                "cache": str(cache) if isinstance(cache, (str, Path)) else type(cache).__name__,
            })
            _log(
                f"train-from-cache: {len(ds)} images, {iters_per_epoch} steps/epoch x {cfg.epochs} epochs, "
                f"batch {cfg.batch_size} x {info.world} process(es), {n_params / 1e6:.2f}M params, "
                f"head {cfg.model.head}, device {device}"
            )

        losses: list[float] = []
        summary: dict[str, Any] = {}
        epoch_metrics: dict[str, Any] = dict(ckpt.get("metrics") or {}) if ckpt else {}
        images_seen, t_train = 0, 0.0
        model.train()
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            bar = None
            if progress and info.is_main:
                from tqdm import tqdm

                bar = tqdm(total=iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                           dynamic_ncols=True, leave=True)
            ep_loss, ep_n, win_t, win_imgs, win_n = 0.0, 0, 0.0, 0, 0
            cpu_ep = time.process_time()
            win_parts: dict[str, float] = {}
            t_ep = time.perf_counter()
            t_prev = time.perf_counter()
            for batch in loader:
                batch = batch_to(batch, device)
                sel = train_select(batch, cfg.max_boxes_per_image,
                                   cfg.loss.unmatched_per_image if cfg.loss.iou_unmatched else 0)
                with autocast_ctx(device, cfg.amp):
                    outp = net(batch, sel)
                loss, parts = compute_losses(outp, batch, cfg.loss)
                if not torch.isfinite(loss):
                    raise MfdetrError(f"non-finite loss at epoch {epoch + 1} step {step + 1}: {parts}; lower --lr or use --amp off")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                else:
                    gnorm = float("nan")
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                lv = float(loss.detach())
                losses.append(lv)
                ep_loss += lv
                ep_n += 1
                nb = int(batch["valid"].shape[0]) * info.world
                now = time.perf_counter()
                win_t += now - t_prev
                t_prev = now
                win_imgs += nb
                win_n += 1
                images_seen += nb
                for k, v in parts.items():
                    win_parts[k] = win_parts.get(k, 0.0) + float(v)
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or ep_n == iters_per_epoch:
                    ips = win_imgs / max(win_t, 1e-9)
                    rec = {
                        "type": "step", "epoch": epoch + 1, "step": step, "loss": lv,
                        "lr": scheduler.get_last_lr()[0], "grad_norm": gnorm, "images_per_s": ips,
                    }
                    rec.update({k: v / max(win_n, 1) for k, v in win_parts.items()})
                    if info.is_main:
                        _append_jsonl(metrics_path, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{lv:.3f}", img_s=f"{ips:.1f}")
                    win_t, win_imgs, win_n, win_parts = 0.0, 0, 0, {}
            if bar is not None:
                bar.close()
            ep_secs = time.perf_counter() - t_ep
            t_train += ep_secs
            train_loss = dist_utils.all_mean([ep_loss / max(ep_n, 1)], info, device)[0]
            epoch_metrics = {"type": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                             "seconds": ep_secs, "cpu_seconds": time.process_time() - cpu_ep,
                             "images_per_s": ep_n * cfg.batch_size * info.world / max(ep_secs, 1e-9)}
            t_val = time.perf_counter()
            if val_loader is not None:
                epoch_metrics.update(validate(model, val_loader, device, cfg.amp, cfg.val_max_images,
                                              cfg.val_max_boxes_per_image))
                epoch_metrics["val_seconds"] = time.perf_counter() - t_val
            improved = False
            if "val_miou" in epoch_metrics:
                improved = epoch_metrics["val_miou"] > best
                best = max(best, epoch_metrics["val_miou"])
            rngs = dist_utils.all_gather_object(_rng_state(), info)
            if info.is_main:
                _append_jsonl(metrics_path, epoch_metrics)
                msg = f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}"
                if "val_miou" in epoch_metrics:
                    msg += (f", val mean mask IoU {epoch_metrics['val_miou']:.4f} over "
                            f"{int(epoch_metrics['val_boxes'])} matched boxes (IoU-head MAE {epoch_metrics['val_iou_head_mae']:.3f})")
                _log(msg + f", {ep_secs:.1f}s")
                ck = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "mfdetr_version": __version__,
                    "model_config": to_dict(cfg.model), "train_config": to_dict(cfg),
                    "levels": _level_dicts(model.levels), "query_dim": int(ds.query_dim),
                    "detector": dict((getattr(ds, "attrs", None) or {}).get("detector") or {"levels": _level_dicts(ds.levels), "query_dim": int(ds.query_dim)}),
                    "cache": {
                        "fingerprint": getattr(ds, "fingerprint", None), "path": str(cache) if isinstance(cache, (str, Path)) else None,
                        "options": (getattr(ds, "attrs", None) or {}).get("options"), "num_images": len(ds),
                    },
                    "dataset": (getattr(ds, "attrs", None) or {}).get("dataset"),
                    "epoch": epoch + 1, "step": step, "best": best, "metrics": epoch_metrics, "world": info.world,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if cfg.amp == "fp16" else None,
                    "rng": rngs, "sampler": {"seed": cfg.seed, "next_epoch": epoch + 1},
                }
                # the checkpoint's own copy of the detector levels must list every cache level
                ck["detector"].setdefault("levels", _level_dicts(ds.levels))
                save_checkpoint(ck, ckpt_dir / f"epoch_{epoch + 1:03d}.pt")
                save_checkpoint(ck, ckpt_dir / "last.pt")
                if improved or "val_miou" not in epoch_metrics:
                    save_checkpoint(ck, ckpt_dir / "best.pt")
            dist_utils.barrier(info)

        summary = {
            "run_dir": str(out),
            "checkpoint": str(ckpt_dir / "last.pt"),
            "best_checkpoint": str(ckpt_dir / "best.pt"),
            "epochs": cfg.epochs,
            "steps": step,
            "train_loss": epoch_metrics.get("train_loss", float("nan")),
            "val_miou": epoch_metrics.get("val_miou", float("nan")),
            "best_val_miou": best if best >= 0 else float("nan"),
            "seconds": time.perf_counter() - t_start,
            "train_seconds": t_train,
            "images_per_s": images_seen / max(t_train, 1e-9) if images_seen else float("nan"),
            "params": n_params,
            "losses": losses,
            "resumed_from": int(ckpt["epoch"]) if ckpt is not None else None,
        }
        return summary
    finally:
        torch.set_num_threads(prev_threads)
        dist_utils.cleanup(info)
