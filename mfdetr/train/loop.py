"""Stage two: train the mask network from a cache (``mfdetr train-from-cache``).

``train_from_cache(cache, out, cfg)`` reads records from a ``CacheDataset`` (features, boxes, queries,
matched mask targets), never a detector, an image or an annotation file. It reads top to bottom:
set up the process (device, DDP, threads), open the caches, prepare the run directory (resume or
fresh), build the run (model, optimizer, schedule, loaders), then per epoch ``train_one_epoch`` (one
``train_step`` per batch, :mod:`mfdetr.train.step`) and ``finish_epoch`` (validate, log, checkpoint).

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
exactly as the uninterrupted run (same loss sequence, same final weights; on CPU, bitwise), and
``metrics.jsonl`` is cut back to the restored step first. A resume on a cache whose number of images
changed since the checkpoint is refused (the schedule would change).

DDP: launched by ``torchrun`` (``WORLD_SIZE > 1``): gloo on CPU, NCCL on GPU, the same sampler
sharded by rank; rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfdetr.errors import MfdetrError
from mfdetr.model.checkpoint import build_checkpoint
from mfdetr.train.checkpointing import check_resumable, rng_state, write_epoch_checkpoints
from mfdetr.train.config import TrainConfig
from mfdetr.train.data import check_cache_fits, maybe_preload, open_caches
from mfdetr.train.runtime import compute_threads, log, resolve_workers
from mfdetr.train.setup import Run, announce, build_run, prepare_run_dir, resume_run
from mfdetr.train.step import train_step
from mfdetr.train.validation import validate
from mfdetr.utils import distributed as dist_utils
from mfdetr.utils.config import to_dict
from mfdetr.utils.device import resolve_device
from mfdetr.utils.progress import progress_bar


@dataclass
class TrainResult:
    """What a ``train_from_cache`` call did. ``losses``: the loss of every step of this call (a resume
    from epoch e: the steps after e); NaN metrics when there was none (no val cache, nothing left to do)."""

    run_dir: str
    checkpoint: str
    best_checkpoint: str
    epochs: int
    steps: int
    train_loss: float
    val_miou: float
    best_val_miou: float
    seconds: float
    train_seconds: float
    images_per_s: float
    params: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None

    def scalars(self) -> dict[str, Any]:
        """Every field but ``losses`` (for summaries and JSON)."""
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


# ---------------------------------------------------------------------------------------------- epochs
def train_one_epoch(run: Run, epoch: int, progress: bool) -> dict[str, Any]:
    """One pass over the train loader; -> the epoch record (train loss, seconds, images/s)."""
    cfg, info = run.cfg, run.info
    run.sampler.set_epoch(epoch)
    bar = progress_bar(
        total=run.iters_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="it",
        leave=True,
        enabled=progress and info.is_main,
    )
    ep_loss, ep_n, t_ep, cpu_ep = 0.0, 0, time.perf_counter(), time.process_time()
    win: dict[str, float] = {"t": 0.0, "images": 0, "n": 0}
    t_prev = time.perf_counter()
    for batch in run.loader:
        res = train_step(
            run.model,
            batch,
            run.optimizer,
            run.scaler,
            cfg,
            run.device,
            run.scheduler,
            run.net,
            where=f"epoch {epoch + 1} step {run.step + 1}",
        )
        run.step += 1
        run.losses.append(res.loss)
        ep_loss, ep_n = ep_loss + res.loss, ep_n + 1
        now = time.perf_counter()
        win["t"], win["images"], win["n"], t_prev = (
            win["t"] + now - t_prev,
            win["images"] + res.images * info.world,
            win["n"] + 1,
            now,
        )
        run.images_seen += res.images * info.world
        for k, v in res.parts.items():
            win[k] = win.get(k, 0.0) + v
        bar.update(1)
        if run.step % cfg.log_every == 0 or ep_n == run.iters_per_epoch:
            ips = win["images"] / max(win["t"], 1e-9)
            rec = {
                "type": "step",
                "epoch": epoch + 1,
                "step": run.step,
                "loss": res.loss,
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": res.grad_norm,
                "images_per_s": ips,
            }
            rec.update({k: v / max(win["n"], 1) for k, v in win.items() if k not in ("t", "images", "n")})
            run.metrics.append(rec)
            bar.set_postfix(loss=f"{res.loss:.3f}", img_s=f"{ips:.1f}")
            win = {"t": 0.0, "images": 0, "n": 0}
    bar.close()
    secs = time.perf_counter() - t_ep
    run.train_seconds += secs
    train_loss = dist_utils.all_mean([ep_loss / max(ep_n, 1)], info, run.device)[0]
    return {
        "type": "epoch",
        "epoch": epoch + 1,
        "step": run.step,
        "train_loss": train_loss,
        "seconds": secs,
        "cpu_seconds": time.process_time() - cpu_ep,
        "images_per_s": ep_n * cfg.batch_size * info.world / max(secs, 1e-9),
    }


def finish_epoch(run: Run, record: dict[str, Any]) -> None:
    """Validate (rank 0), log the epoch, write its checkpoints (rank 0; RNG states of every rank)."""
    cfg, info = run.cfg, run.info
    if run.val_loader is not None:
        t_val = time.perf_counter()
        record.update(
            validate(
                run.model,
                run.val_loader,
                run.device,
                cfg.amp,
                cfg.val_max_images,
                cfg.val_max_boxes_per_image,
            )
        )
        record["val_seconds"] = time.perf_counter() - t_val
    improved = "val_miou" not in record or record["val_miou"] > run.best
    if "val_miou" in record:
        run.best = max(run.best, record["val_miou"])
    run.epoch_metrics = record
    rngs = dist_utils.all_gather_object(rng_state(), info)
    if info.is_main:
        run.metrics.append(record)
        msg = f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f}"
        if "val_miou" in record:
            msg += (
                f", val mean mask IoU {record['val_miou']:.4f} over {int(record['val_boxes'])} matched boxes "
                f"(IoU-head MAE {record['val_iou_head_mae']:.3f})"
            )
        log(msg + f", {record['seconds']:.1f}s")
        write_epoch_checkpoints(epoch_checkpoint(run, record, rngs), run.ckpt_dir, improved)
    dist_utils.barrier(info)


def epoch_checkpoint(run: Run, record: dict[str, Any], rngs: list[Any]) -> dict[str, Any]:
    cfg, ds = run.cfg, run.ds
    return build_checkpoint(
        run.model,
        model_config=to_dict(cfg.model),
        train_config=to_dict(cfg),
        cache_attrs=getattr(ds, "attrs", None),
        cache_levels=ds.levels,
        query_dim=int(ds.query_dim),
        cache_path=str(run.cache) if isinstance(run.cache, (str, Path)) else None,
        num_images=len(ds),
        progress={
            "epoch": record["epoch"],
            "step": run.step,
            "best": run.best,
            "metrics": record,
            "world": run.info.world,
        },
        state={
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if cfg.amp == "fp16" else None,
            "rng": rngs,
            "sampler": {"seed": cfg.seed, "next_epoch": record["epoch"]},
        },
    )


# ----------------------------------------------------------------------------------------------- entry
def train_from_cache(
    cache: Any,
    out: str | Path,
    cfg: TrainConfig | None = None,
    val_cache: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the mask network on ``cache`` (path, URL or CacheDataset) into run directory ``out``.

    ``resume``: continue from ``out/checkpoints/last.pt`` (else the newest readable epoch checkpoint),
    exactly (see the module doc). Prints nothing but progress and log lines on stderr.
    """
    cfg = (cfg or TrainConfig()).validate()
    out, t_start, prev_threads = Path(out), time.perf_counter(), torch.get_num_threads()
    device0 = resolve_device(cfg.device, 0)
    if cfg.amp == "fp16" and device0.type != "cuda":
        raise MfdetrError("amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    info = dist_utils.init_distributed(device0)
    try:
        device = resolve_device(cfg.device, info.local_rank) if device0.type == "cuda" else device0
        if device.type == "cuda":
            torch.cuda.set_device(device)
        ds, vds = open_caches(cache, val_cache, cfg)
        resume_from = prepare_run_dir(out, resume, info)
        if resume_from is not None:
            check_cache_fits(ds, cfg.model, f"train cache {cache}", resume_from[1], resume_from[0])
            check_resumable(resume_from[1], resume_from[0], ds, cfg, cache)
        dist_utils.barrier(info)
        ds, vds, workers = maybe_preload(ds, vds, cfg, info, progress, resolve_workers(cfg, device, info))
        torch.set_num_threads(compute_threads(cfg, device, info, workers))
        run = build_run(cfg, out, cache, ds, vds, info, device, workers)
        start = resume_run(run, *resume_from) if resume_from is not None else 0
        announce(run, start)
        run.model.train()
        for epoch in range(start, cfg.epochs):
            finish_epoch(run, train_one_epoch(run, epoch, progress))
        return _result(run, t_start, resume_from)
    finally:
        torch.set_num_threads(prev_threads)
        dist_utils.cleanup(info)


def _result(run: Run, t_start: float, resume_from: Any) -> TrainResult:
    from mfdetr.model import count_parameters

    m, nan = run.epoch_metrics, float("nan")
    return TrainResult(
        run_dir=str(run.out),
        checkpoint=str(run.ckpt_dir / "last.pt"),
        best_checkpoint=str(run.ckpt_dir / "best.pt"),
        epochs=run.cfg.epochs,
        steps=run.step,
        train_loss=m.get("train_loss", nan),
        val_miou=m.get("val_miou", nan),
        best_val_miou=run.best if run.best >= 0 else nan,
        seconds=time.perf_counter() - t_start,
        train_seconds=run.train_seconds,
        images_per_s=run.images_seen / max(run.train_seconds, 1e-9) if run.images_seen else nan,
        params=count_parameters(run.model),
        losses=run.losses,
        resumed_from=int(resume_from[1]["epoch"]) if resume_from is not None else None,
    )
