"""Process set-up of a training run: the torch device, the autocast context, the CPU thread count
and stderr logging that leaves progress bars intact."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from typing import Any

import torch

from mfdetr.errors import MfdetrError
from mfdetr.train.config import TrainConfig
from mfdetr.utils.distributed import torchrun_env


def log(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except Exception:  # pragma: no cover
        print(msg, file=sys.stderr)


def autocast_ctx(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` (``off`` -> no-op)."""
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise MfdetrError("amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def compute_threads(
    cfg: TrainConfig, device: torch.device, info: Any = None, workers: int | None = None
) -> int:
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
    local = torchrun_env().local_world
    return max(1, cores // local - (resolve_workers(cfg, device, info) if workers is None else workers))


def resolve_workers(cfg: TrainConfig, device: torch.device, info: Any = None) -> int:
    """``cfg.workers``, or for -1 (auto): 2 on CPU (they share the cores with the step); on CUDA the
    cores per local process minus one (the training process), 1 to 8: enough to keep a GPU fed."""
    if cfg.workers >= 0:
        return cfg.workers
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = torchrun_env().local_world
    return max(1, min(8, cores // local - 1))
