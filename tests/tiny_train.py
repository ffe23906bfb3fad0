"""A tiny, fast ``train-from-cache`` run on the CPU (a small network, few points, one thread, batches of 4):
as a ``TrainConfig`` (``small_train``, its network ``small_net``) for the Python API tests and as command-line
flags (``fast_train_flags``) for the CLI tests that train."""

from __future__ import annotations

from mfdetr.model.config import LossConfig, MaskNetConfig
from mfdetr.train.config import TrainConfig


def small_net(**kw) -> MaskNetConfig:
    """A narrow mask network (every stage of the default head present); ``kw`` overrides fields."""
    base = dict(dim=32, box_dim=16, roi_size=16, fcn_roi_size=8, fcn_dim=16)
    base.update(kw)
    return MaskNetConfig(**base)


def small_train(**kw) -> TrainConfig:
    """Two epochs of ``small_net`` on the CPU, one thread, no workers, a record every step; ``kw`` overrides."""
    base = dict(
        model=small_net(),
        loss=LossConfig(num_points=128),
        epochs=2,
        batch_size=4,
        lr=2e-3,
        warmup_iters=2,
        workers=0,
        threads=1,
        device="cpu",
        log_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


TINY_NET = [
    "--set",
    "model.dim=16",
    "--set",
    "model.box_dim=8",
    "--set",
    "model.roi_size=8",
    "--set",
    "loss.num_points=64",
    "--set",
    "warmup_iters=1",
]


def fast_train_flags(workers: int = 0) -> list[str]:
    """``train-from-cache`` flags for a tiny CPU run with ``workers`` DataLoader workers."""
    return [
        "--batch-size",
        "4",
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        *TINY_NET,
    ]
