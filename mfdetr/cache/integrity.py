"""Per-block integrity manifests: what a writer stored, checked by the reader, ``verify`` and repair.

Every array's codecs end in crc32c, so a flipped bit or a truncated shard fails to decode; but a
*missing* object reads as fill values (zeros) without a word. The manifest closes that gap: for
every block the writer records, after writing the block's arrays and before setting ``done``, the
size and crc32c of the one stored object of every array (``ABSENT`` where the block of that array
holds only fill values, which Zarr does not store). It is the small array ``manifest``
``[num_blocks, A, 2]`` int64 (one chunk per block, unsharded, fill 0 = "no manifest"); its attribute
``mfdetr_manifest`` names the A arrays in column order (every cache array but ``done``).

Checks built on it (none lists a store, so plain HTTP works):
- ``block_problems``: done blocks without a manifest, manifests whose ``done`` chunk vanished, and
  ``bad`` chunks that should be stored but read as fill (free: arrays read at open anyway);
- ``GuardedStore``: a store wrapper that turns a read of a missing object the manifest lists into
  ``MissingObjectError`` (no extra request: it only looks at reads that came back empty);
- ``check_objects``: presence + size of every object (``quick``), or its crc32c (full);
- ``check_metadata``: every array's ``zarr.json`` against the consolidated copy in the root.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from mfdetr.cache.codecs import create_spec_array
from mfdetr.cache.schema import (
    ATTR_KEY,
    FEAT_GROUP,
    ArraySpec,
    array_specs,
    quiet_zarr,
)
from mfdetr.errors import MfdetrError

MANIFEST = "manifest"
MANIFEST_ATTR = "mfdetr_manifest"
ABSENT = -1  # size column: the block of this array is all fill values (no object stored)


@dataclass
class Problem:
    """One thing wrong with a cache. ``kind``: missing | size | checksum | decode | unexpected |
    no-manifest | done-missing | metadata | partial | content."""

    kind: str
    message: str
    array: str | None = None
    block: int | None = None
    positions: tuple[int, int] | None = None  # [start, stop) image positions
    image_ids: list[int] | None = None
    key: str | None = None  # the store object

    def __str__(self) -> str:
        if self.message.startswith("image position"):  # one image's problem: it names itself
            return self.message
        where = []
        if self.array:
            where.append(f"array {self.array}")
        if self.block is not None:
            where.append(f"block {self.block}")
        if self.positions is not None:
            where.append(f"image positions {self.positions[0]}..{self.positions[1] - 1}")
        if self.image_ids:
            where.append("ids " + ",".join(str(i) for i in self.image_ids))
        return (", ".join(where) + ": " if where else "") + self.message


class MissingObjectError(Exception):
    """A store object that the manifest lists is absent."""

    def __init__(self, key: str, array: str, block: int) -> None:
        super().__init__(f"object {key} is missing (the integrity manifest says block {block} stored it)")
        self.key, self.array, self.block = key, array, block


def manifest_names(meta: dict[str, Any]) -> list[str]:
    """The arrays a manifest row covers, in column order."""
    return [s.name for s in array_specs(meta) if s.name != "done"]


def manifest_spec(meta: dict[str, Any]) -> ArraySpec:
    names = manifest_names(meta)
    n, b = int(meta["dataset"]["num_images"]), int(meta["options"]["block"])
    nb = max(1, (n + b - 1) // b)
    return ArraySpec(
        MANIFEST,
        (nb, len(names), 2),
        "int64",
        (1, len(names), 2),
        None,
        0,
        False,
        {MANIFEST_ATTR: {"arrays": names, "columns": ["size", "crc32c"]}},
    )


def create_manifest(group: zarr.Group, meta: dict[str, Any]) -> None:
    """Create the manifest array (race-safe: an existing one is kept)."""
    create_spec_array(group, manifest_spec(meta), meta["options"])


class Layout:
    """Block -> store keys of one cache (one object per array per block, as the schema lays it out)."""

    def __init__(self, group: zarr.Group, meta: dict[str, Any]) -> None:
        self.names = manifest_names(meta)
        self.n = int(meta["dataset"]["num_images"])
        self.block = int(meta["options"]["block"])
        self.num_blocks = max(1, (self.n + self.block - 1) // self.block)
        self.index = {name: a for a, name in enumerate(self.names)}
        self.md = {}
        for name in self.names + ["done"]:
            md = group[name].metadata
            outer = tuple(md.chunk_grid.chunk_shape)
            if outer[0] != self.block or tuple(outer[1:]) != tuple(md.shape[1:]):
                raise MfdetrError(
                    f"array {name}: chunk grid {outer} is not one object per block of {self.block}; "
                    "mfdetr.cache.integrity cannot check this layout"
                )
            self.md[name] = md

    def key(self, name: str, b: int) -> str:
        md = self.md[name]
        return f"{name}/{md.encode_chunk_key((b,) + (0,) * (len(md.shape) - 1))}"

    def positions(self, b: int) -> tuple[int, int]:
        return b * self.block, min(self.n, (b + 1) * self.block)


def _crc(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


async def _object_row(store: Any, key: str) -> tuple[int, int]:
    from zarr.core.buffer import default_buffer_prototype

    buf = await store.get(key, default_buffer_prototype())
    if buf is None:
        return ABSENT, 0
    data = buf.to_bytes()
    return len(data), _crc(data)


def record_block(
    store: Any, layout: Layout, b: int, known: dict[str, bytes | None] | None = None
) -> np.ndarray:
    """[A, 2] (size, crc32c) of block ``b``'s stored objects, read back from the store; ``known``: the
    bytes the caller has just stored for some arrays (None: no object), summed without a read-back."""
    from zarr.core.sync import sync

    known = known or {}

    async def _row(name: str) -> tuple[int, int]:
        if name not in known:
            return await _object_row(store, layout.key(name, b))
        data = known[name]
        return (ABSENT, 0) if data is None else (len(data), _crc(data))

    async def _all() -> list[tuple[int, int]]:
        return await asyncio.gather(*(_row(n) for n in layout.names))

    return np.asarray(sync(_all()), dtype=np.int64)


def read_manifest(group: zarr.Group) -> np.ndarray | None:
    """The manifest [num_blocks, A, 2], or None for a cache written before manifests existed."""
    try:
        arr = group[MANIFEST]
    except KeyError:
        return None
    return np.asarray(arr[:], dtype=np.int64)


def block_problems(
    layout: Layout, manifest: np.ndarray | None, done: np.ndarray, bad: np.ndarray, reread_done: Any = None
) -> dict[int, Problem]:
    """Damaged blocks visible from ``done``, ``bad`` and the manifest alone (see module doc).
    ``reread_done(b)`` re-reads a block's flags: a manifest is written just before ``done``, so a block
    in that instant (a concurrent extract) is given a moment before it counts as damaged."""
    out: dict[int, Problem] = {}
    if manifest is None:
        return out
    have = (manifest[:, :, 0] != 0).any(axis=1)
    bad_col = layout.index.get("bad")
    for b in range(layout.num_blocks):
        s, e = layout.positions(b)
        bdone = bool(done[s:e].all())
        if bdone and not have[b]:
            out[b] = Problem(
                "no-manifest",
                "done but its integrity manifest is missing (manifest chunk lost)",
                MANIFEST,
                b,
                (s, e),
                key=f"{MANIFEST}/{layout.md['done'].encode_chunk_key((b,))}",
            )
        elif have[b] and not done[s:e].any():
            if reread_done is not None:
                time.sleep(0.2)
                if bool(reread_done(b)):
                    continue
            out[b] = Problem(
                "done-missing",
                "its arrays and manifest were written but the done flags are "
                "missing (the done chunk was lost, or an extract was killed at that instant)",
                "done",
                b,
                (s, e),
                key=layout.key("done", b),
            )
        elif bdone and bad_col is not None and manifest[b, bad_col, 0] > 0 and not bad[s:e].any():
            out[b] = Problem(
                "missing", "object missing (reads as fill values)", "bad", b, (s, e), key=layout.key("bad", b)
            )
    return out


async def _check_one(store: Any, key: str, size: int, crc: int, full: bool) -> str | None:
    from zarr.core.buffer import default_buffer_prototype

    if size == ABSENT:
        return "unexpected" if await store.exists(key) else None
    if not full:
        try:
            got = int(await store.getsize(key))
        except (FileNotFoundError, KeyError):
            return "missing"
        return None if got == size else f"size {got}"
    buf = await store.get(key, default_buffer_prototype())
    if buf is None:
        return "missing"
    data = buf.to_bytes()
    if len(data) != size:
        return f"size {len(data)}"
    return None if _crc(data) == crc else "checksum"


def check_objects(
    store: Any, layout: Layout, manifest: np.ndarray, blocks: list[int], full: bool, concurrency: int = 64
) -> list[Problem]:
    """Every object of ``blocks`` against the manifest: presence and size, plus crc32c when ``full``."""
    from zarr.core.sync import sync

    jobs = [(b, n) for b in blocks for n in layout.names if manifest[b, layout.index[n], 0] != 0]

    async def _all() -> list[str | None]:
        sem = asyncio.Semaphore(concurrency)

        async def one(b: int, n: int | str) -> str | None:
            size, crc = (int(v) for v in manifest[b, layout.index[n]])
            async with sem:
                return await _check_one(store, layout.key(n, b), size, crc, full)

        return await asyncio.gather(*(one(b, n) for b, n in jobs))

    out = []
    for (b, n), res in zip(jobs, sync(_all())):
        if res is None:
            continue
        size = int(manifest[b, layout.index[n], 0])
        kind, msg = res, ""
        if res == "missing":
            msg = f"object {layout.key(n, b)} is missing ({size} bytes in the manifest)"
        elif res == "unexpected":
            msg = f"object {layout.key(n, b)} exists but the manifest says the block is all fill values"
        elif res == "checksum":
            msg = f"object {layout.key(n, b)} differs from what was written (crc32c mismatch)"
        else:
            kind, msg = (
                "size",
                f"object {layout.key(n, b)} is {res.split()[1]} bytes, the manifest says {size}",
            )
        out.append(Problem(kind, msg, n, b, layout.positions(b), key=layout.key(n, b)))
    return out


# ---------------------------------------------------------------------------------------------
# metadata documents


def expected_metadata(group: zarr.Group, layout: Layout) -> dict[str, bytes]:
    """key -> the bytes Zarr wrote for every array's / sub-group's ``zarr.json`` (from the root's
    consolidated metadata, which ``open_cache`` already parsed)."""
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    out = {}
    for name in layout.names + ["done", MANIFEST]:
        try:
            md = group[name].metadata
        except KeyError:
            continue
        out[f"{name}/zarr.json"] = md.to_buffer_dict(proto)["zarr.json"].to_bytes()
    sub = group[FEAT_GROUP].metadata
    sub = dataclasses.replace(sub, consolidated_metadata=None)
    out[f"{FEAT_GROUP}/zarr.json"] = sub.to_buffer_dict(proto)["zarr.json"].to_bytes()
    return out


def check_metadata(store: Any, expected: dict[str, bytes]) -> list[Problem]:
    """Metadata files that are missing or differ from the consolidated copy."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def _all() -> list[Any]:
        return await asyncio.gather(*(store.get(k, default_buffer_prototype()) for k in expected))

    out = []
    for (key, want), got in zip(expected.items(), sync(_all())):
        if got is None or got.to_bytes() != want:
            what = "missing" if got is None else "damaged (differs from the copy consolidated in zarr.json)"
            out.append(Problem("metadata", f"metadata file {key} is {what}", key.rsplit("/", 1)[0], key=key))
    return out


def write_metadata(store: Any, expected: dict[str, bytes], keys: list[str]) -> None:
    """Rewrite the given metadata files from their consolidated copies."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()
    for key in keys:
        sync(store.set(key, proto.buffer.from_bytes(expected[key])))


@quiet_zarr()
def rewrite_root(path_arg: str, meta: dict[str, Any]) -> None:
    """Rewrite a damaged root ``zarr.json`` as creation writes it: the ``mfdetr`` attribute, then
    consolidated metadata of the (intact) array documents."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata
    from zarr.core.sync import sync

    store = (
        zarr.storage.FsspecStore.from_url(path_arg)
        if "://" in path_arg
        else zarr.storage.LocalStore(path_arg)
    )
    doc = GroupMetadata(attributes={ATTR_KEY: meta}).to_buffer_dict(default_buffer_prototype())["zarr.json"]
    sync(store.set("zarr.json", doc))
    zarr.consolidate_metadata(path_arg)


def repair_scan(
    group: zarr.Group, meta: dict[str, Any], blocks: list[int], full: bool
) -> tuple[list[int], list[str]]:
    """For ``extract``: (damaged blocks among ``blocks``, metadata files rewritten from the consolidated
    copy). ``full`` reads every object (crc32c); else presence + sizes only."""
    layout = Layout(group, meta)
    expected = expected_metadata(group, layout)
    fixed = [p.key for p in check_metadata(group.store, expected) if p.key]
    write_metadata(group.store, expected, fixed)
    manifest = read_manifest(group)
    if manifest is None:
        return [], fixed
    done = np.asarray(group["done"][:], bool)
    bad = np.asarray(group["bad"][:], bool)
    damaged = set(block_problems(layout, manifest, done, bad)) & set(blocks)
    todo = [b for b in blocks if b not in damaged and bool(done[slice(*layout.positions(b))].all())]
    damaged |= {int(p.block) for p in check_objects(group.store, layout, manifest, todo, full)}  # type: ignore
    return sorted(damaged), fixed
