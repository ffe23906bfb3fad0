"""One training step of the mask network (``train_step``): the single implementation that
``train_from_cache`` and ``benchmarks/train_speed.py`` run, plus the optimizer / scaler it steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mfdetr.cache.batch import batch_to
from mfdetr.errors import MfdetrError
from mfdetr.model.losses import compute_losses
from mfdetr.train.config import TrainConfig
from mfdetr.train.runtime import autocast_ctx
from mfdetr.train.selection import train_select


@dataclass
class StepResult:
    """What one step did: the loss (float), its parts, the gradient norm before clipping (NaN when
    clipping is off), the images and boxes it trained on (this process)."""

    loss: float
    parts: dict[str, float]
    grad_norm: float
    images: int
    boxes: int


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and level embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("level_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), foreach=True
    )


def build_scaler(device: torch.device, cfg: TrainConfig) -> torch.amp.GradScaler:
    """The fp16 loss scaler (a no-op for amp off / bf16)."""
    return torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16"))


def train_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    scheduler: Any = None,
    net: torch.nn.Module | None = None,
    where: str = "",
) -> StepResult:
    """Move ``batch`` to ``device``, pick its boxes (``train_select``, global torch RNG), forward under
    ``cfg.amp`` autocast through ``net`` (the DDP wrapper; default ``model``), losses, backward, clip
    to ``cfg.grad_clip``, optimizer (+ ``scheduler``) step. A non-finite loss is an MfdetrError."""
    batch = batch_to(batch, device, non_blocking=True)
    n_unmatched = cfg.loss.unmatched_per_image if cfg.loss.iou_unmatched else 0
    sel = train_select(batch, cfg.max_boxes_per_image, n_unmatched)
    with autocast_ctx(device, cfg.amp):
        out = (net or model)(batch, sel)
    loss, parts = compute_losses(out, batch, cfg.loss)
    if not torch.isfinite(loss):
        raise MfdetrError(
            f"non-finite loss{' at ' + where if where else ''}: {parts}; lower --lr or use --amp off"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    gnorm = float("nan")
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return StepResult(
        loss=float(loss.detach()),
        parts={k: float(v) for k, v in parts.items()},
        grad_norm=gnorm,
        images=int(batch["valid"].shape[0]),
        boxes=int(sel.sum()),
    )
