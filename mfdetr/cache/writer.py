"""Writing a cache: create-or-open a store safely, and write whole blocks of images.

Safety rules (docs/DESIGN.md, "Cache"):
- a store is created once: the group is born with an ``mfdetr_incomplete`` marker, then come
  every array, then the ``mfdetr`` metadata attribute (and consolidated metadata). Creation never
  deletes data and never writes the marker over finished metadata, so independent jobs
  (``--shard i/n``) may race to create the same store: they all write identical metadata. A store
  whose ``mfdetr`` fingerprint differs is refused with a clear error.
- a writer owns whole blocks (= shards) and writes each block's arrays once, ``done`` last; a killed
  writer leaves ``done`` unset for its current block, which the next run rewrites whole.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mfdetr.cache.codecs import create_spec_array
from mfdetr.cache.integrity import MANIFEST, Layout, create_manifest, record_block, rewrite_root
from mfdetr.cache.schema import (
    ATTR_KEY,
    FEAT_GROUP,
    INCOMPLETE_KEY,
    ArraySpec,
    array_specs,
    check_meta,
    quiet_zarr,
)
from mfdetr.cache.shards import ShardEncoder, encode_image
from mfdetr.errors import MfdetrError


def is_url(path: str | os.PathLike) -> bool:
    """True for fsspec URLs (``s3://``, ``http://``, ``memory://``, ...), False for local paths."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def local_path(path: str | os.PathLike) -> Path | None:
    """The local filesystem path of a store, or None for a remote URL."""
    s = str(path)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return None if is_url(s) else Path(s)


def store_arg(path: str | os.PathLike) -> str:
    """What zarr.open_group takes for ``path`` (local paths as str, URLs as they are)."""
    lp = local_path(path)
    return str(lp) if lp is not None else str(path)


# ---------------------------------------------------------------------------------------------
# store creation / opening


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    if old.get("detector", {}).get("fingerprint") != new["detector"]["fingerprint"]:
        diffs.append(
            f"detector {old.get('detector', {}).get('spec')!r} fp "
            f"{str(old.get('detector', {}).get('fingerprint'))[:12]} vs {new['detector']['spec']!r} fp "
            f"{new['detector']['fingerprint'][:12]}"
        )
    if old.get("dataset", {}).get("fingerprint") != new["dataset"]["fingerprint"]:
        diffs.append(
            f"dataset {old.get('dataset', {}).get('annotations')!r} vs {new['dataset']['annotations']!r}"
        )
    oo, no = old.get("options", {}), new["options"]
    for key in sorted(set(oo) | set(no)):
        if oo.get(key) != no.get(key):
            diffs.append(f"options.{key} {oo.get(key)!r} vs {no.get(key)!r}")
    return "; ".join(diffs) or "schema or version"


def _check_local_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise MfdetrError(f"cache path {path} exists and is a file, not a Zarr store; choose another --out")
    # "*.partial" are Zarr's in-flight atomic writes (temp file, then rename): a concurrent job creating
    # this store right now, or a write a crash left behind; neither makes the directory someone else's
    if (
        path.is_dir()
        and not (path / "zarr.json").exists()
        and any(not p.name.endswith(".partial") for p in path.iterdir())
    ):
        raise MfdetrError(
            f"cache path {path} is a non-empty directory that is not a Zarr store; choose another --out"
        )


def _open_group(path: str, mode: str, attributes: dict[str, Any] | None = None) -> zarr.Group:
    try:
        try:
            return zarr.open_group(store_arg(path), mode=mode, attributes=attributes)
        except (zarr.errors.ContainsGroupError, FileExistsError):
            # another job created it between our "is it there?" and "create it": open theirs
            return zarr.open_group(store_arg(path), mode="r+")
    except FileNotFoundError as e:
        raise MfdetrError(f"no cache at {path}") from e


def _create_array(g: zarr.Group, spec: ArraySpec, opts: dict[str, Any]) -> None:
    if not create_spec_array(g, spec, opts):
        a = g[spec.name]
        if tuple(a.shape) != spec.shape or np.dtype(a.dtype) != np.dtype(spec.dtype):
            raise MfdetrError(
                f"array {spec.name} exists with shape {a.shape} {a.dtype}, expected {spec.shape} {spec.dtype}; "
                "the store is from another extraction: delete it or choose another --out"
            )


def _check_root(path: str, meta: dict[str, Any], repair: bool) -> None:
    """A root ``zarr.json`` that is unreadable, or lost its ``mfdetr`` attribute while arrays exist, is
    rewritten with ``repair`` (the caller vouches the store is this extraction's), else refused."""
    lp = local_path(path)
    if lp is not None and not (lp / "zarr.json").exists():
        if not (lp / "done" / "zarr.json").exists():
            return  # nothing (or not a cache) there: creation decides
        why = "is missing"
    else:
        try:
            g = zarr.open_group(store_arg(path), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return
        except Exception as e:
            why = f"is damaged ({type(e).__name__}: {e})"
        else:
            if (
                g.attrs.get(ATTR_KEY) is not None
                or g.attrs.get(INCOMPLETE_KEY) is not None
                or "done" not in g
            ):
                return
            why = f"has lost its '{ATTR_KEY}' attribute"
    if not repair:
        raise MfdetrError(
            f"metadata file {str(path).rstrip('/')}/zarr.json {why}: if this store was written by this same "
            "extract command, rerun it with --repair (rewrites the metadata from these options); otherwise "
            "delete the store or choose another --out"
        )
    rewrite_root(store_arg(path), meta)


@quiet_zarr()
def create_or_open(path: str, meta: dict[str, Any], create: bool = True, repair: bool = False) -> zarr.Group:
    """Open the store at ``path`` for writing the cache described by ``meta``, creating it if absent.

    Raises MfdetrError when the path holds another cache (different fingerprint, with what differs),
    something that is not an mfdetr cache, or (``create=False``) nothing. A damaged root ``zarr.json``
    is an error, rewritten instead with ``repair``.
    """
    fp = meta["fingerprint"]
    _check_root(path, meta, repair)
    lp = local_path(path)
    if lp is not None:
        _check_local_target(lp)
        if not create and not (lp / "zarr.json").exists():
            raise MfdetrError(f"no cache at {path} (rank 0 should have created it)")
    # a new group is born with the "being created" marker (one atomic write): a concurrent job never
    # sees an unmarked group, and nobody ever writes the marker over finished metadata
    g = _open_group(path, "a", {INCOMPLETE_KEY: fp}) if create else _open_group(path, "r+")
    existing = g.attrs.get(ATTR_KEY)
    if existing is not None:
        if not isinstance(existing, dict) or existing.get("fingerprint") != fp:
            old_fp = existing.get("fingerprint", "?") if isinstance(existing, dict) else "?"
            raise MfdetrError(
                f"{path} holds another cache (fingerprint {str(old_fp)[:12]}, this extraction's is {fp[:12]}): "
                f"differs in {_describe_mismatch(existing if isinstance(existing, dict) else {}, meta)}. "
                "Use another --out, or --cache-root to name stores by fingerprint."
            )
        check_meta(existing, str(path))
        if create and g.metadata.consolidated_metadata is None:  # killed right after creation: finish it
            zarr.consolidate_metadata(store_arg(path))
            g = zarr.open_group(store_arg(path), mode="r+")
        if create and MANIFEST not in g:  # a cache from before integrity manifests: add one
            create_manifest(g, meta)
            zarr.consolidate_metadata(store_arg(path))
            g = zarr.open_group(store_arg(path), mode="r+")
            BlockWriter(g, meta).adopt_done_blocks()
        return g
    if not create:
        raise MfdetrError(f"{path} is not a complete mfdetr cache yet (rank 0 should have created it)")
    marker = g.attrs.get(INCOMPLETE_KEY)
    if marker is None and len(list(g.keys())) > 0:
        raise MfdetrError(f"{path} is a Zarr group that is not an mfdetr cache; choose another --out")
    if marker is not None and marker != fp:
        raise MfdetrError(
            f"{path} holds an interrupted creation of another cache (fingerprint {str(marker)[:12]}); "
            "delete it or choose another --out"
        )
    if marker is None:  # an empty group that was already there: adopt it
        g.attrs[INCOMPLETE_KEY] = fp
    try:
        g.require_group(FEAT_GROUP)
    except (zarr.errors.ContainsGroupError, FileExistsError):
        pass  # a concurrent job just made it
    for spec in array_specs(meta):
        _create_array(g, spec, meta["options"])
    create_manifest(g, meta)
    g.attrs.put({ATTR_KEY: meta})
    zarr.consolidate_metadata(store_arg(path))
    return zarr.open_group(store_arg(path), mode="r+")


# ---------------------------------------------------------------------------------------------
# blocks


def _filled(shape: tuple[int, ...], fill: Any, dtype: str) -> np.ndarray:
    if fill == 0 or fill is False:
        return np.zeros(shape, dtype=dtype)  # calloc: pages zeroed lazily, no pass over big feature blocks
    return np.full(shape, fill, dtype=dtype)


async def _drain() -> None:
    """Wait for Zarr's other tasks (errors dropped: one is being raised): none pending at exit."""
    me = asyncio.current_task()
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me), return_exceptions=True)


class BlockBuffer:
    """One block (positions ``start..stop``), filled image by image: the small arrays in memory, the
    sharded ones (``encoders``) as each image's encoded inner chunks (compressed as the image arrives)."""

    def __init__(
        self,
        block: int,
        start: int,
        stop: int,
        specs: list[ArraySpec],
        encoders: dict[str, ShardEncoder] | None = None,
    ) -> None:
        self.block, self.start, self.stop = block, start, stop
        self.encoders = encoders or {}
        self.arrays = {
            s.name: _filled((stop - start, *s.shape[1:]), s.fill_value, s.dtype)
            for s in specs
            if s.name not in self.encoders
        }
        self.chunks: dict[str, list[memoryview | None]] = {n: [None] * (stop - start) for n in self.encoders}
        self.specs = {s.name: s for s in specs}
        self.filled = np.zeros(stop - start, dtype=bool)

    def _feature(self, position: int, name: str, v: np.ndarray) -> np.ndarray:
        """A level map zero padded bottom/right to the cache's padded shape."""
        spec = self.specs[name]
        c, h, w = v.shape
        tail = spec.shape[1:]
        if c != tail[0] or h > tail[1] or w > tail[2]:
            raise MfdetrError(
                f"image position {position}: level {name[len(FEAT_GROUP) + 1 :]} map is {tuple(v.shape)}, "
                f"larger than the cache's padded {tuple(tail)}: the detector's input_size() "
                "disagrees with what detect() returned"
            )
        if (h, w) == tuple(tail[1:]):
            return v
        out = _filled(tail, spec.fill_value, spec.dtype)
        out[:, :h, :w] = v
        return out

    def _encode(self, j: int, chunks: dict[str, np.ndarray]) -> None:
        from zarr.core.sync import sync

        async def _all() -> dict[str, Any]:
            missing = [n for n in self.encoders if n not in chunks]  # no value: the fill (as Zarr's buffer)
            fills = await asyncio.gather(*(self.encoders[n].encode_fill() for n in missing))
            return {**dict(zip(missing, fills, strict=True)), **await encode_image(self.encoders, chunks)}

        for name, data in sync(_all()).items():
            self.chunks[name][j] = data

    def put(self, position: int, values: dict[str, np.ndarray]) -> None:
        """Store one image's arrays (feature maps may be smaller than the padded shape)."""
        j = position - self.start
        chunks: dict[str, np.ndarray] = {}
        for name, v in values.items():
            v = np.asarray(v)
            if name.startswith(FEAT_GROUP + "/"):
                v = self._feature(position, name, v)
            if name in self.encoders:
                chunks[name] = self.encoders[name].chunk(v)
            else:
                self.arrays[name][j] = v
        if self.encoders:
            self._encode(j, chunks)
        self.filled[j] = True

    def put_bad(self, position: int, image_id: int) -> None:
        """Mark one image as skipped (bad input): no data, ``bad`` set."""
        j = position - self.start
        self.arrays["image_id"][j] = image_id
        self.arrays["bad"][j] = True
        if self.encoders:
            self._encode(j, {})
        self.filled[j] = True

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


class BlockWriter:
    """Writes whole blocks into an open cache group; ``done`` last."""

    @quiet_zarr()
    def __init__(self, group: zarr.Group, meta: dict[str, Any]) -> None:
        self.group = group
        self.meta = meta
        self.specs = array_specs(meta)
        self.n = int(meta["dataset"]["num_images"])
        self.block = int(meta["options"]["block"])
        self._arrays = {s.name: group[s.name] for s in self.specs}
        # the feature maps skip Zarr's empty-chunk test (a full pass over each map comparing it with the
        # fill value, as costly as compressing it); the small arrays keep it: integrity reads a present
        # ``bad`` chunk as "some image of the block is bad"
        for name in self._arrays:
            if name.startswith(FEAT_GROUP + "/"):
                self._arrays[name] = self._arrays[name].with_config({"write_empty_chunks": True})
        # the sharded arrays: encoded image by image and stored as whole shards (mfdetr/cache/shards.py)
        self.encoders: dict[str, ShardEncoder] = {}
        for spec in self.specs:
            if spec.shards is not None:
                enc = ShardEncoder.for_array(group[spec.name], spec.name.startswith(FEAT_GROUP + "/"))
                if enc is not None:
                    self.encoders[spec.name] = enc
        self.layout = Layout(group, meta)

    @property
    def num_blocks(self) -> int:
        return (self.n + self.block - 1) // self.block

    def block_range(self, b: int) -> tuple[int, int]:
        return b * self.block, min(self.n, (b + 1) * self.block)

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._arrays["done"][:], dtype=bool)

    def pending_blocks(self, owned: list[int]) -> list[int]:
        """The blocks of ``owned`` with at least one image not done."""
        done = self.done_mask()
        out = []
        for b in owned:
            s, e = self.block_range(b)
            if not done[s:e].all():
                out.append(b)
        return out

    def new_buffer(self, b: int) -> BlockBuffer:
        s, e = self.block_range(b)
        return BlockBuffer(b, s, e, self.specs, self.encoders)

    def write(self, buf: BlockBuffer) -> None:
        """Write every array of a complete block, then its ``done`` flags."""
        if not buf.complete:
            raise RuntimeError(f"block {buf.block} written before all its images arrived")
        from zarr.core.sync import sync

        sel = slice(buf.start, buf.stop)
        store = self.group.store

        async def _all() -> dict[str, bytes | None]:
            names = list(self.encoders)
            ours = [
                self.encoders[n].write(store, self.layout.key(n, buf.block), buf.chunks[n]) for n in names
            ]
            zarr_writes = [
                self._arrays[spec.name]._async_array.setitem(sel, buf.arrays[spec.name])
                for spec in self.specs
                if spec.name != "done" and spec.name not in self.encoders
            ]
            stored = await asyncio.gather(*ours, *zarr_writes)
            return dict(zip(names, stored[: len(names)], strict=True))

        try:
            shards = sync(
                _all()
            )  # every data array of the block (concurrently), then what they stored, then:
        except BaseException:
            sync(_drain())  # a failed write (disk full) leaves its sibling writes running: let them end
            raise
        self.group[MANIFEST][buf.block] = record_block(store, self.layout, buf.block, known=shards)
        self._arrays["done"][sel] = np.ones(buf.stop - buf.start, dtype=bool)

    def clear_blocks(self, blocks: list[int]) -> None:
        """Mark blocks not done (then drop their manifests), so that the run rewrites them whole."""
        from zarr.core.sync import sync

        for b in blocks:
            s, e = self.block_range(b)
            self._arrays["done"][s:e] = np.zeros(e - s, dtype=bool)
            self.group[MANIFEST][b] = 0
            for name in self.layout.names:  # Zarr merges a shard write into a damaged old shard: drop it
                sync(self.group.store.delete(self.layout.key(name, b)))

    def adopt_done_blocks(self) -> None:
        """Manifests for done blocks written before manifests existed: what the store holds now."""
        done = self.done_mask()
        for b in range(self.num_blocks):
            s, e = self.block_range(b)
            if done[s:e].all():
                self.group[MANIFEST][b] = record_block(self.group.store, self.layout, b)
