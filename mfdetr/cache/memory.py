"""Holding a small cache in RAM: every record decoded once, then served from memory.

Reading a record costs Zarr decompression, bit unpacking and float16 -> float32 conversion; on a CPU
that runs in DataLoader worker processes which compete with the training step for the cores (on the
2-core reference machine the step then gets one thread). When the decoded cache fits a memory budget,
``preload`` reads it once (in parallel worker processes, with a progress bar) and training indexes
memory with no workers, so the step gets every core. The records are the reader's, exactly: features
and queries stored as float16 / bfloat16 are kept in that dtype (lossless: that is what the cache
holds) and converted to float32 per access, so a preloaded run equals a streamed one bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mfdetr.cache.loader import make_loader
from mfdetr.utils.progress import progress_bar

_COMPACT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_list(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return records


def _compact(record: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    if dtype is None:
        return record
    out = dict(record)
    out["features"] = {k: v.to(dtype) for k, v in record["features"].items()}
    if torch.is_tensor(record.get("queries")):
        out["queries"] = record["queries"].to(dtype)
    return out


def _expand(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    out["features"] = {k: v.float() for k, v in record["features"].items()}
    if torch.is_tensor(record.get("queries")):
        out["queries"] = record["queries"].float()
    return out


def record_nbytes(record: dict[str, Any]) -> int:
    """Bytes of the tensors of one record (features included)."""
    n = 0
    for v in record.values():
        if torch.is_tensor(v):
            n += v.nbytes
        elif isinstance(v, dict):
            n += sum(t.nbytes for t in v.values() if torch.is_tensor(t))
    return n


def compact_dtype(ds: Any) -> torch.dtype | None:
    """The dtype features/queries can be held in without loss: the cache's storage dtype if 16-bit."""
    return _COMPACT.get(str(getattr(ds, "dtype", "") or ""))


def estimate_bytes(ds: Any) -> int:
    """RAM a preload of ``ds`` would take (first record's compacted size x number of records)."""
    if len(ds) == 0:
        return 0
    return record_nbytes(_compact(ds[0], compact_dtype(ds))) * len(ds)


class InMemoryDataset(Dataset):
    """The records of ``base`` held in RAM; everything else (levels, query_dim, collate, attrs,
    fingerprint, ...) is the base dataset's."""

    def __init__(self, base: Any, records: list[dict[str, Any]], compact: bool):
        self.base = base
        self.records = records
        self.compact = compact

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j: int) -> dict[str, Any]:
        r = self.records[j]
        return _expand(r) if self.compact else dict(r)

    def collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return self.base.collate(records)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "records", "compact"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


def preload(
    ds: Any, workers: int = 2, progress: bool = True, desc: str = "preload", skip_damaged: bool = False
) -> InMemoryDataset:
    """Decode every record of ``ds`` once (``workers`` processes) and return them as an
    ``InMemoryDataset``, in dataset order."""
    dtype = compact_dtype(ds)
    if skip_damaged and hasattr(ds, "skip_damaged"):
        ds.skip_damaged = True  # damaged records come back as None (with a warning): left out here
    loader: DataLoader = make_loader(
        ds, batch_size=16, workers=workers, collate_fn=_as_list, persistent=False
    )
    bar = None
    if progress:
        bar = progress_bar(total=len(ds), desc=desc)
    records: list[dict[str, Any]] = []
    for chunk in loader:
        records.extend(_compact(r, dtype) for r in chunk if r is not None)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return InMemoryDataset(ds, records, compact=dtype is not None)
