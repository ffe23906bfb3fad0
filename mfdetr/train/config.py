"""``TrainConfig``: the settings of ``mfdetr train-from-cache`` (TOML table ``[train]``), its checks, and
how the CLI builds one (defaults <- TOML file <- ``--set`` overrides <- explicit options)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mfdetr.errors import MfdetrError
from mfdetr.model.config import LossConfig, MaskNetConfig


@dataclass
class TrainConfig:
    """Training of the mask network from a cache (TOML table ``[train]`` in a pipeline).

    model / loss: the network (``MaskNetConfig``) and its losses (``LossConfig``).
    epochs: passes over the train cache (>= 1). batch_size: images per step (per process under DDP).
    lr / weight_decay: AdamW (no decay on biases, norms and embeddings).
    warmup_iters: linear warmup steps. schedule: ``cosine`` (to ``min_lr_ratio`` x lr) or ``step``
        (x ``step_gamma`` at each fraction of the run in ``step_milestones``).
    grad_clip: max global gradient norm (0 = off).
    amp: ``off`` | ``bf16`` | ``fp16`` autocast (CUDA; bf16 also allowed on CPU, fp16 is not).
    workers: DataLoader worker processes; -1 = auto (2 on CPU, where they share the cores with the
        step; on CUDA the cores per process minus one, at most 8, so the loader keeps the GPU fed).
    device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
    threads: torch CPU threads of the training process (0 = auto: on CPU the cores per process left
        after the DataLoader workers, at least 1; see ``compute_threads``). Results are a function of
        the thread count (and of nothing else on the machine, such as its load).
    seed: seeds the model init, the sampler and every random draw (boxes and points per step).
    log_every: steps between ``metrics.jsonl`` step records and bar updates.
    max_boxes_per_image: matched boxes per image that get a mask loss per step, sampled at random
        (0 = all); bounds the per-step cost on crowded images.
    val_batch_size / val_max_images: validation batch size and image cap (0 = all val images).
    preload: hold the decoded caches in RAM (``mfdetr/cache/memory.py``): read once by ``workers``
        processes, then training indexes memory with no workers and every core goes to the step
        (results identical). ``auto``: when the train + val caches take at most ``preload_max_gb``
        GiB (per local process) and half the available memory; ``on``: always; ``off``: stream.
    val_max_boxes_per_image: matched boxes validated per image, one per object first (its best-
        scored box), 0 = all (top-k over query x class yields several boxes per object).
    allow_partial: train on a cache an extract has not finished (its done images only; a loud warning).
    skip_damaged: skip records that fail their integrity check instead of stopping (a count is logged).
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
    workers: int = -1
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
    allow_partial: bool = False
    skip_damaged: bool = False

    def validate(self) -> TrainConfig:
        """Raise MfdetrError naming the first bad field (and its CLI option); returns self."""
        check_train_config(self)
        return self


# the numeric fields, by the bound each keeps: > 0.0 (``_POSITIVE``), else >= the smallest value allowed
_POSITIVE = ("lr", "step_gamma")
_AT_LEAST: list[tuple[float, tuple[str, ...]]] = [
    (-1, ("workers",)),
    (0, ("warmup_iters", "threads", "max_boxes_per_image", "val_max_images", "val_max_boxes_per_image")),
    (0.0, ("weight_decay", "min_lr_ratio", "grad_clip", "preload_max_gb")),
    (1, ("epochs", "batch_size", "val_batch_size", "log_every")),
]


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')} (train.{name})"


def _choices() -> dict[str, tuple[Any, ...]]:
    """field -> its allowed values, for every ``Literal`` field of ``TrainConfig``."""
    hints = typing.get_type_hints(TrainConfig)
    return {n: typing.get_args(tp) for n, tp in hints.items() if typing.get_origin(tp) is Literal}


def check_train_config(cfg: TrainConfig) -> None:
    """Every numeric field finite and in range, every choice one of its values."""
    for name, choices in _choices().items():
        if getattr(cfg, name) not in choices:
            raise MfdetrError(
                f"{_option(name)} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}"
            )
    bounds = [(n, 0.0, True) for n in _POSITIVE] + [(n, low, False) for low, ns in _AT_LEAST for n in ns]
    for name, low, strict in bounds:
        v = getattr(cfg, name)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or (v <= low if strict else v < low)
        ):
            want = f"> {low}" if strict else f">= {low}"
            raise MfdetrError(f"{_option(name)} must be a finite number {want}, got {v!r}")
    if cfg.min_lr_ratio > 1:
        raise MfdetrError(f"{_option('min_lr_ratio')} must be <= 1, got {cfg.min_lr_ratio}")
    if any(not (0.0 <= m <= 1.0) for m in cfg.step_milestones):
        raise MfdetrError(
            f"train.step_milestones are fractions of the run in [0, 1], got {cfg.step_milestones}"
        )


def build_train_config(
    config: Path | str | None = None, sets: list[str] | None = None, explicit: dict[str, Any] | None = None
) -> TrainConfig:
    """TrainConfig = defaults <- TOML file (top level, or its ``[train]`` table) <- ``--set`` <- options
    (``explicit``; None values are left out), validated."""
    from mfdetr.utils.config import apply_overrides, from_dict, load_toml_with_base

    data: dict[str, Any] = {}
    if config is not None:
        data = load_toml_with_base(config)  # an ablation inherits its base file's [train] too
        data.pop("name", None)  # the experiment's name, not a training setting
        if isinstance(data.get("train"), dict):  # a pipeline TOML: take its [train] table
            data = data["train"]
    data = apply_overrides(data, list(sets or []))
    for key, value in (explicit or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(TrainConfig, data).validate()
