"""Command-line flags for a tiny, fast ``train-from-cache`` run on the CPU (a small network, few points,
one thread, batches of 4), shared by the CLI tests that train."""

from __future__ import annotations

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
