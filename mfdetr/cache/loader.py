"""The DataLoader over cache records, one set-up for every reader (training, validation, preload)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader


def worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    ds: Any,
    batch_size: int,
    workers: int,
    sampler: Any = None,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    pin_memory: bool = False,
    collate_fn: Any = None,
    persistent: bool = True,
) -> DataLoader:
    """A DataLoader over cache records (collate = the dataset's unless ``collate_fn``), workers
    started by forkserver (kept across epochs when ``persistent``)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        import multiprocessing as mp

        kw = {
            "multiprocessing_context": "forkserver"
            if "forkserver" in mp.get_all_start_methods()
            else "spawn",
            "persistent_workers": persistent,
            "prefetch_factor": 4,
            "worker_init_fn": worker_init,
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
