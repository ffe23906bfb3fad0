"""The reader's side of the cache's integrity: checks at open, a store wrapper that makes a missing
object loud, and the one-line error that names the damage and its repair."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.storage import WrapperStore

from mfdetr.cache.integrity import (
    Layout,
    MissingObjectError,
    Problem,
    block_problems,
    check_metadata,
    check_objects,
    expected_metadata,
    read_manifest,
)
from mfdetr.errors import MfdetrError


class GuardedStore(WrapperStore):
    """Raises ``MissingObjectError`` when a read of an object the manifest lists comes back empty."""

    def __init__(self, store: Any, index: dict[str, int], present: np.ndarray) -> None:
        super().__init__(store)
        self._index, self._present = index, present

    def _with_store(self, store: Any) -> GuardedStore:
        return type(self)(store, self._index, self._present)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None:
            name, sep, rest = key.rpartition("/c/")
            a = self._index.get(name) if sep else None
            if a is not None:
                b = int(rest.split("/", 1)[0])
                if b < len(self._present) and self._present[b, a]:
                    raise MissingObjectError(key, name, b)
        return buf


def present_mask(manifest: np.ndarray | None, num_blocks: int, num_arrays: int) -> np.ndarray:
    """[num_blocks, A] bool: the objects the manifest says are stored."""
    if manifest is None:
        return np.zeros((num_blocks, num_arrays), bool)
    return manifest[:, :, 0] > 0


class DamagedCacheError(MfdetrError):
    """A damaged record or cache. Raised in a DataLoader worker, torch re-raises it with the worker's
    traceback in the message; the original one-line message is recovered here (the CLI prints one line)."""

    def __init__(self, message: str, arrays: list[str] | None = None, position: int | None = None) -> None:
        if message.startswith("Caught DamagedCacheError") and "DamagedCacheError: " in message:
            message = message.rsplit("DamagedCacheError: ", 1)[1].strip()
        super().__init__(message)
        self.arrays, self.position = arrays or [], position


def repair_hint(path: str) -> str:
    return (
        f"repair it with `mfdetr extract ... --repair` (the same options that wrote {path}; only damaged "
        f"blocks are re-extracted), list every problem with `mfdetr cache verify {path}`, or read on "
        "without the damaged images with skip_damaged=True (`--skip-damaged`)"
    )


@dataclass
class ReadGuard:
    """What a reader keeps of the integrity checks at open: the objects that must exist (for
    ``GuardedStore``) and the damaged blocks it skips."""

    index: dict[str, int]
    present: np.ndarray
    damaged: dict[int, Problem]


@dataclass
class BlockChecks:
    """What ``check_blocks`` found without reading any block's objects: the layout, the integrity manifest
    (None: written by an older mfdetr), the damaged metadata files and the damaged blocks."""

    layout: Layout
    manifest: np.ndarray | None
    metadata: list[Problem]
    blocks: dict[int, Problem]

    def object_problems(self, store: Any, done: np.ndarray, full: bool) -> list[Problem]:
        """``check_objects`` of every fully done block not already damaged (none without a manifest):
        presence and sizes, with ``full`` crc32c too."""
        if self.manifest is None:
            return []
        blocks = [
            b
            for b in range(self.layout.num_blocks)
            if b not in self.blocks and bool(done[slice(*self.layout.positions(b))].all())
        ]
        return check_objects(store, self.layout, self.manifest, blocks, full=full)


def check_blocks(
    group: zarr.Group, meta: dict[str, Any], done: np.ndarray, bad: np.ndarray, reread: bool = False
) -> BlockChecks:
    """``block_problems`` and the metadata files' checks of a cache whose ``done``/``bad`` flags were just
    read. ``reread``: a block that looks damaged has its flags read again (an extract may be writing it)."""
    layout = Layout(group, meta)
    manifest = read_manifest(group)  # after ``done``: a block done then had its manifest already

    def reread_done(b: int) -> bool:
        s, e = layout.positions(b)
        return bool(np.asarray(group["done"][s:e]).all())

    blocks = block_problems(layout, manifest, done, bad, reread_done if reread else None)
    return BlockChecks(
        layout, manifest, check_metadata(group.store, expected_metadata(group, layout)), blocks
    )


def open_checks(
    group: zarr.Group, meta: dict[str, Any], path: str, done: np.ndarray, bad: np.ndarray, skip_damaged: bool
) -> ReadGuard:
    """A reader's checks at open (``check_blocks``; with ``skip_damaged`` also presence + sizes of every
    done block's objects, so that damaged blocks are skipped up front).
    Raises DamagedCacheError on a problem unless ``skip_damaged`` (then warns with a count)."""
    checks = check_blocks(group, meta, done, bad, reread=True)
    damaged, meta_probs, layout = checks.blocks, checks.metadata, checks.layout
    if skip_damaged:
        for p in checks.object_problems(group.store, done, full=False):
            damaged.setdefault(int(p.block), p)  # type: ignore[arg-type]
    probs = meta_probs + [damaged[b] for b in sorted(damaged)]
    if probs and not skip_damaged:
        more = f" (and {len(probs) - 1} more problem(s))" if len(probs) > 1 else ""
        raise DamagedCacheError(f"cache {path} is damaged: {probs[0]}{more}; {repair_hint(path)}")
    if probs:
        n_img = sum(p.positions[1] - p.positions[0] for p in damaged.values() if p.positions)
        warnings.warn(
            f"cache {path}: skipping {len(damaged)} damaged block(s) ({n_img} image positions)"
            + (f"; {len(meta_probs)} damaged metadata file(s) ignored" if meta_probs else "")
            + f": first: {probs[0]}",
            stacklevel=3,
        )
    return ReadGuard(
        layout.index, present_mask(checks.manifest, layout.num_blocks, len(layout.names)), damaged
    )


def describe(err: BaseException) -> str:
    """A reading error in words."""
    if isinstance(err, MissingObjectError):
        return str(err)
    text = str(err)
    if "checksum" in text.lower():
        return "stored and computed crc32c differ (flipped bits, a truncated or a half-copied object)"
    return f"{type(err).__name__}: {text}"
