"""Whole shards of the big arrays, encoded image by image and stored as one object per block.

Zarr's own sharded write (``arr[s:e] = block``) re-reads the shard, builds a fill-value array per inner
chunk and copies the block into it before encoding, all after the block's last image. Here
``ShardEncoder`` encodes each image's inner chunk as soon as the image arrives (with the array's own
inner codec pipeline, as its metadata declares it) and, when the block is complete, assembles the Zarr v3
``sharding_indexed`` object itself: the inner chunks in Morton order, then (or before, with
``index_location = "start"``) the shard index of ``(offset, nbytes)`` uint64 pairs encoded with the
index codecs, ``2**64 - 1`` pairs for absent chunks. Zarr reads the object back as the same values; the
bytes are the ones Zarr writes itself (``tests/test_cache_shards.py`` checks both).

Only the layout the schema gives big arrays is handled (one image per inner chunk, one block per
shard); ``ShardEncoder.for_array`` returns None for anything else, and the writer falls back to Zarr.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

MAX_UINT_64 = 2**64 - 1  # an absent inner chunk's (offset, nbytes) in the shard index


class ShardEncoder:
    """Encodes one sharded array's inner chunks (one image each) and assembles its shard objects.

    write_empty: encode inner chunks that hold only the fill value (Zarr's ``write_empty_chunks``);
        otherwise they are left out of the shard (index pair ``2**64 - 1``), as Zarr leaves them.
    """

    def __init__(self, array: Any, write_empty: bool) -> None:
        from zarr.codecs import ShardingCodec
        from zarr.core.array_spec import ArrayConfig, ArraySpec
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.dtype import UInt64
        from zarr.core.indexing import morton_order_iter
        from zarr.registry import get_pipeline_class

        md = array.metadata
        (sharding,) = md.codecs
        if not isinstance(sharding, ShardingCodec):
            raise TypeError(f"array {array.name}: not sharded")
        self.name = array.path
        self.md = md
        self.tail = tuple(md.shape[1:])
        self.per_shard = int(md.chunk_grid.chunk_shape[0])
        self.dtype = md.data_type.to_native_dtype()
        self.fill = md.fill_value
        self.write_empty = write_empty
        self.index_at_start = sharding.index_location.value == "start"
        self.proto = default_buffer_prototype()
        self.pipeline = get_pipeline_class().from_codecs(sharding.codecs)
        self.chunk_spec = ArraySpec(
            shape=tuple(sharding.chunk_shape),
            dtype=md.data_type,
            fill_value=md.fill_value,
            config=ArrayConfig(order="C", write_empty_chunks=write_empty),
            prototype=self.proto,
        )
        self.index_pipeline = get_pipeline_class().from_codecs(sharding.index_codecs)
        per_shard = tuple(
            s // c for s, c in zip(md.chunk_grid.chunk_shape, sharding.chunk_shape, strict=True)
        )
        self.index_spec = ArraySpec(  # as zarr's ShardingCodec describes its index to the index codecs
            shape=per_shard + (2,),
            dtype=UInt64(endianness="little"),
            fill_value=MAX_UINT_64,
            config=ArrayConfig(order="C", write_empty_chunks=False),
            prototype=self.proto,
        )
        # inner chunks are images along axis 0 (the layout check in for_array): position j <-> (j, 0, ...)
        self.order = [c[0] for c in morton_order_iter(per_shard)]
        self._fill_chunk: memoryview | None | bool = False  # False: not encoded yet

    @classmethod
    def for_array(cls, array: Any, write_empty: bool) -> ShardEncoder | None:
        """An encoder for ``array``, or None when its layout is not one image per inner chunk of a shard."""
        from zarr.codecs import ShardingCodec

        md = array.metadata
        if getattr(md, "zarr_format", None) != 3 or len(md.codecs) != 1:
            return None
        sharding = md.codecs[0]
        if not isinstance(sharding, ShardingCodec) or sharding.index_location.value not in ("start", "end"):
            return None
        outer = tuple(md.chunk_grid.chunk_shape)
        if tuple(sharding.chunk_shape) != (1, *md.shape[1:]) or outer[1:] != tuple(md.shape[1:]):
            return None
        return cls(array, write_empty)

    def chunk(self, values: Any) -> np.ndarray:
        """One image's inner chunk as ``arr[j] = values`` would store it (cast, broadcast)."""
        v = np.asarray(values)
        if v.shape == self.tail and v.dtype == self.dtype and v.flags.c_contiguous:
            return v
        out = np.empty(self.tail, dtype=self.dtype)
        out[...] = v
        return out

    async def encode(self, chunk: np.ndarray) -> memoryview | None:
        """The encoded inner chunk of one image; None when Zarr would not store it (fill only)."""
        nd = self.proto.nd_buffer.from_numpy_array(chunk.reshape(self.chunk_spec.shape))
        if not self.write_empty and nd.all_equal(self.fill):
            return None
        (buf,) = await self.pipeline.encode([(nd, self.chunk_spec)])
        return None if buf is None else memoryview(buf.as_numpy_array())  # no copy until assemble

    async def encode_fill(self) -> memoryview | None:
        """The inner chunk of an image without data (bad image): encoded once, reused."""
        if self._fill_chunk is False:
            self._fill_chunk = await self.encode(np.full(self.tail, self.fill, dtype=self.dtype))
        return self._fill_chunk  # type: ignore[return-value]

    async def _index(self, pairs: np.ndarray) -> bytes:
        nd = self.proto.nd_buffer.from_numpy_array(pairs)
        (buf,) = await self.index_pipeline.encode([(nd, self.index_spec)])
        return buf.to_bytes()

    async def assemble(self, chunks: list[memoryview | None]) -> bytes | None:
        """The shard object of one block from its images' inner chunks (position order; a block at the
        end of the array may be shorter than a shard). None when no chunk is stored (Zarr stores no
        object then)."""
        pairs = np.full(self.index_spec.shape, MAX_UINT_64, dtype="<u8")
        flat = pairs.reshape(-1, 2)
        parts, offset = [], 0
        for j in self.order:
            c = chunks[j] if j < len(chunks) else None
            if not c:
                continue
            flat[j] = (offset, len(c))
            parts.append(c)
            offset += len(c)
        if not parts:
            return None
        index = await self._index(pairs)
        if self.index_at_start:
            stored = flat[:, 0] != MAX_UINT_64
            flat[stored, 0] += len(index)
            return b"".join([await self._index(pairs), *parts])
        return b"".join([*parts, index])

    async def write(self, store: Any, key: str, chunks: list[memoryview | None]) -> bytes | None:
        """Assemble a block's shard and put it into ``store`` at ``key`` (a block of nothing but fill
        values: no object, as Zarr); returns the bytes stored."""
        data = await self.assemble(chunks)
        if data is None:
            await store.delete(key)
        else:
            await store.set(key, self.proto.buffer.from_bytes(data))
        return data


async def encode_image(encoders: dict[str, ShardEncoder], chunks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Encode one image's chunks of several arrays concurrently: ``{name: bytes | None}``."""
    names = list(chunks)
    out = await asyncio.gather(*(encoders[n].encode(chunks[n]) for n in names))
    return dict(zip(names, out, strict=True))
