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

The pieces, re-exported here: ``TrainConfig`` (:mod:`mfdetr.train.config`), opening and
checking caches, the DataLoader and preloading (:mod:`mfdetr.train.data`), device, autocast
and threads (:mod:`mfdetr.train.runtime`), the boxes of a step (:mod:`mfdetr.train.selection`)
and validation (:mod:`mfdetr.train.validation`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from mfdetr import __version__
from mfdetr.cache.batch import batch_to
from mfdetr.utils import distributed as dist_utils
from mfdetr.train.selection import top_per_row, train_select, val_select  # noqa: F401
from mfdetr.train.schedule import build_scheduler
from mfdetr.train.config import TrainConfig
from mfdetr.cache.loader import make_loader
from mfdetr.train.data import check_cache_fits, has_targets, level_dicts, maybe_preload, open_dataset
from mfdetr.train.runtime import log, autocast_ctx, compute_threads, resolve_device  # noqa: F401
from mfdetr.train.validation import validate
from mfdetr.errors import MfdetrError
from mfdetr.model.checkpoint import FORMAT, FORMAT_VERSION, read_checkpoint, save_checkpoint
from mfdetr.model.losses import compute_losses
from mfdetr.utils.config import to_dict


# ------------------------------------------------------------------------------------------ helpers
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
    from mfdetr.model import build_mask_net, count_parameters

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
    if cfg.amp == "fp16" and device.type != "cuda":
        raise MfdetrError("amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    if cfg.batch_size < 1 or cfg.epochs < 0:
        raise MfdetrError(f"batch size must be >= 1 and epochs >= 0 (got {cfg.batch_size}, {cfg.epochs})")

    try:
        ds = open_dataset(cache, "train cache")
        if not has_targets(ds):
            raise MfdetrError(f"train cache {cache} has no mask targets (extracted without annotations?)")
        check_cache_fits(ds, cfg.model, f"train cache {cache}")
        vds = open_dataset(val_cache, "val cache") if val_cache is not None else None
        if vds is not None:
            check_cache_fits(vds, cfg.model, f"val cache {val_cache}")
            if level_dicts(vds.levels) != level_dicts(ds.levels) or vds.query_dim != ds.query_dim:
                raise MfdetrError(
                    f"val cache {val_cache} (levels {level_dicts(vds.levels)}, query_dim {vds.query_dim}) does not "
                    f"match train cache {cache} (levels {level_dicts(ds.levels)}, query_dim {ds.query_dim})"
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
                log(msg)
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
            log(
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
                log(msg + f", {ep_secs:.1f}s")
                ck = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "mfdetr_version": __version__,
                    "model_config": to_dict(cfg.model), "train_config": to_dict(cfg),
                    "levels": level_dicts(model.levels), "query_dim": int(ds.query_dim),
                    "detector": dict((getattr(ds, "attrs", None) or {}).get("detector") or {"levels": level_dicts(ds.levels), "query_dim": int(ds.query_dim)}),
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
                ck["detector"].setdefault("levels", level_dicts(ds.levels))
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
