"""Stage one: run the frozen detector once per image and write the Zarr cache (``extract``).

plan (shards, store path, metadata, pending blocks), source (DataLoader side), sink (per-image step),
matching (prediction -> ground truth, mask targets), writers (writer thread / processes), loop (the run).
"""

from mfdetr.cache.schema import ExtractOptions, MatchOptions
from mfdetr.extract.loop import extract
from mfdetr.extract.plan import DEFAULT_CACHE_ROOT, ExtractResult, parse_shard, resolve_store_path

__all__ = [
    "DEFAULT_CACHE_ROOT",
    "ExtractOptions",
    "ExtractResult",
    "MatchOptions",
    "extract",
    "parse_shard",
    "resolve_store_path",
]
