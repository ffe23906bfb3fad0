"""Set-up of a training run (``train_from_cache``'s first half): the run directory (fresh or resumed,
writable), the ``Run`` that holds model, optimizer, schedule, scaler, sampler and loaders between
epochs, restoring a checkpoint into it, and the run's first log lines."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from mfdetr.cache.loader import make_loader
from mfdetr.errors import MfdetrError
from mfdetr.train.checkpointing import find_resume_checkpoint, restore, seed_all
from mfdetr.train.config import TrainConfig
from mfdetr.train.metrics import MetricsLog
from mfdetr.train.runtime import log
from mfdetr.train.schedule import build_scheduler
from mfdetr.train.step import build_optimizer, build_scaler
from mfdetr.utils.config import to_dict
from mfdetr.utils.fs import ensure_writable_dir


@dataclass
class Run:
    """Everything one training run holds between its epochs."""

    cfg: TrainConfig
    out: Path
    cache: Any
    ds: Any
    info: Any
    device: torch.device
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    sampler: DistributedSampler
    loader: Any
    val_loader: Any
    metrics: MetricsLog
    iters_per_epoch: int
    step: int = 0
    best: float = -1.0
    epoch_metrics: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    images_seen: int = 0
    train_seconds: float = 0.0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


# --------------------------------------------------------------------------------------------- set-up
def prepare_run_dir(out: Path, resume: bool, info: Any) -> tuple[Path, dict[str, Any]] | None:
    """Check ``out`` is a writable directory; -> the checkpoint to resume from, or None for a fresh run
    (a run directory that already holds checkpoints is an error: never silently overwritten)."""
    ensure_writable_dir(out, "run directory --out")
    ckpt_dir = out / "checkpoints"
    if not resume:
        if any(ckpt_dir.glob("*.pt")):  # every rank sees the same run dir: all raise, none hangs
            raise MfdetrError(
                f"{out} already holds checkpoints: pass --resume to continue, or choose another --out"
            )
        return None
    path, ckpt, notes = find_resume_checkpoint(ckpt_dir)
    if notes and info.is_main:
        log(f"warning: --resume: {'; '.join(notes)}; resuming from {path} instead")
    return path, ckpt


def build_run(
    cfg: TrainConfig, out: Path, cache: Any, ds: Any, vds: Any, info: Any, device: torch.device, workers: int
) -> Run:
    """Model (seeded), optimizer, LR schedule, scaler, sampler and loaders of a fresh run."""
    from mfdetr.model import build_mask_net

    seed_all(cfg.seed)
    model = build_mask_net(cfg.model, ds.levels, ds.query_dim).to(device)
    optimizer = build_optimizer(model, cfg)
    sampler = DistributedSampler(ds, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg.seed)
    pin = device.type == "cuda"  # pinned host batches: the non_blocking copies in train_step overlap
    loader = make_loader(
        ds,
        cfg.batch_size,
        workers,
        sampler=sampler,
        drop_last=len(sampler) >= cfg.batch_size,
        seed=cfg.seed,
        pin_memory=pin,
    )
    iters = len(loader)
    if iters == 0:
        raise MfdetrError(f"train cache {cache} has no images for this process")
    total = iters * cfg.epochs
    scheduler = build_scheduler(
        optimizer,
        total,
        min(cfg.warmup_iters, max(total // 4, 1)),
        cfg.schedule,
        cfg.min_lr_ratio,
        cfg.step_milestones,
        cfg.step_gamma,
    )
    val_loader = None
    if vds is not None and info.is_main:
        val_loader = make_loader(vds, cfg.val_batch_size, min(workers, 2), seed=cfg.seed, pin_memory=pin)
    net: torch.nn.Module = model
    if info.enabled:
        kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        net = torch.nn.parallel.DistributedDataParallel(model, **kw)
    return Run(
        cfg=cfg,
        out=out,
        cache=cache,
        ds=ds,
        info=info,
        device=device,
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=build_scaler(device, cfg),
        sampler=sampler,
        loader=loader,
        val_loader=val_loader,
        metrics=MetricsLog(out / "metrics.jsonl", info.is_main),
        iters_per_epoch=iters,
    )


def resume_run(run: Run, path: Path, ckpt: dict[str, Any]) -> int:
    """Restore ``ckpt`` into ``run``, cut metrics.jsonl back to its step; -> epochs done."""
    start, run.step, run.best, rng_note = restore(
        ckpt, run.model, run.optimizer, run.scheduler, run.scaler, run.info
    )
    run.epoch_metrics = dict(ckpt["metrics"] or {})
    dropped = run.metrics.truncate_to(run.step)
    msg = (
        f"resumed from {path}: {start}/{run.cfg.epochs} epochs done, step {run.step}, restored model, "
        f"optimizer, scheduler (lr {run.scheduler.get_last_lr()[0]:.3g}), "
        f"{'grad scaler, ' if ckpt['scaler'] else ''}{rng_note}, sampler seed {ckpt['sampler']['seed']} -> "
        f"next epoch {start}"
        + (f"; dropped {dropped} metrics.jsonl line(s) past step {run.step}" if dropped else "")
    )
    if run.info.is_main:
        log(msg)
    run.metrics.append({"type": "resume", "epoch": start, "step": run.step, "message": msg})
    return start


def announce(run: Run, start_epoch: int) -> None:
    """train_config.json, the ``start`` record and the one-line summary of the run (rank 0)."""
    cfg, info = run.cfg, run.info
    if not info.is_main:
        return
    from mfdetr.model import count_parameters

    n_params = count_parameters(run.model)
    try:
        (run.out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    except OSError as e:
        raise MfdetrError(f"cannot write {run.out / 'train_config.json'}: {e.strerror or e}") from e
    run.metrics.append(
        {
            "type": "start",
            "time": time.time(),
            "epochs": cfg.epochs,
            "start_epoch": start_epoch,
            "iters_per_epoch": run.iters_per_epoch,
            "world": info.world,
            "device": str(run.device),
            "params": n_params,
            "train_images": len(run.ds),
            "cache": _cache_name(run.cache),
        }
    )
    log(
        f"train-from-cache: {len(run.ds)} images, {run.iters_per_epoch} steps/epoch x {cfg.epochs} epochs, "
        f"batch {cfg.batch_size} x {info.world} process(es), {n_params / 1e6:.2f}M params, "
        f"head {cfg.model.head}, device {run.device}"
    )


def _cache_name(cache: Any) -> str:
    return str(cache) if isinstance(cache, (str, Path)) else type(cache).__name__
