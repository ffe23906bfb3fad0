"""The codecs of every cache array (``codecs_for``: filters, compressor, crc32c) and its race-safe
creation (``create_spec_array``), from the schema's ``ArraySpec`` and the extract options."""

from __future__ import annotations

from typing import Any

import numpy as np

from mfdetr.cache.schema import ArraySpec
from mfdetr.errors import MfdetrError


def create_spec_array(group: Any, spec: ArraySpec, opts: dict[str, Any]) -> bool:
    """Create ``spec``'s array in ``group`` with its codecs; False when it exists already (race-safe:
    concurrent jobs may create the same store)."""
    import zarr

    layout = {"shape": spec.shape, "dtype": spec.dtype, "chunks": spec.chunks, "shards": spec.shards}
    try:
        group.create_array(
            spec.name,
            **layout,
            fill_value=spec.fill_value,
            attributes=dict(spec.attributes),
            overwrite=False,
            **codecs_for(spec, opts),
        )
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
        return False
    return True


# Blosc's automatic block at level 1 is small; 256 KiB blocks make zstd faster and as small or smaller
BLOSC_ZSTD_BLOCK = 256 * 1024


def codecs_for(spec: ArraySpec, opts: dict[str, Any]) -> dict[str, Any]:
    """``filters`` / ``compressors`` keyword arguments of ``create_array`` for one array."""
    from zarr.codecs import BitRound, BloscCodec, Crc32cCodec, ZstdCodec

    codec = opts["codec"]
    level = opts.get("codec_level")
    itemsize = np.dtype(spec.dtype).itemsize
    if codec == "none":
        compressors: list[Any] = []
    elif codec == "zstd":
        compressors = [ZstdCodec(level=3 if level is None else int(level))]
    elif codec == "lz4":
        compressors = [
            BloscCodec(
                cname="lz4", clevel=5 if level is None else int(level), shuffle="shuffle", typesize=itemsize
            )
        ]
    elif codec == "blosc-zstd":
        compressors = [
            BloscCodec(
                cname="zstd",
                clevel=1 if level is None else int(level),
                shuffle="shuffle",
                typesize=itemsize,
                blocksize=BLOSC_ZSTD_BLOCK,
            )
        ]
    else:  # pragma: no cover - validated earlier
        raise MfdetrError(f"unknown codec {codec!r}")
    compressors.append(Crc32cCodec())  # 4 bytes per chunk: corruption is an error, never silent garbage
    filters: list[Any] = []
    keepbits = opts.get("keepbits")
    # bfloat16 is rounded in the writer (BitRound needs a float dtype; it is stored as uint16)
    if spec.lossy and keepbits is not None and opts["dtype"] != "bfloat16":
        filters = [BitRound(keepbits=int(keepbits))]
    return {"filters": filters, "compressors": compressors}
