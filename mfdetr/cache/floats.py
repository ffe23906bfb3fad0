"""Storage dtype conversion: float tensors <-> the arrays a cache stores (float16, bfloat16, float32).

``to_storage`` runs on any device (extract converts on the detector's GPU before the host copy, which
halves the bytes copied and leaves the writers only compression); ``encode_float`` turns its result, or a
float32 tensor it converts itself, into the numpy array written to disk.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mfdetr.cache.schema import FLOAT16_MAX
from mfdetr.errors import MfdetrError

FLOAT16_MIN_NORMAL = 2.0**-14
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stats_sampled(i: int) -> bool:
    """Whether image ``i`` (in extraction order) feeds the float16 range statistics: the first 8, then
    1 in 16 (underflow is a property of the detector's level; counting costs passes over each map)."""
    return i < 8 or i % 16 == 0


def bitround(x: Tensor, keepbits: int) -> Tensor:
    """float32 ``x`` with its mantissa rounded to ``keepbits`` bits, on x's device: numcodecs.BitRound's
    rule (round half to even on the bit pattern), in int32 arithmetic (wraps like its uint32)."""
    maskbits = 23 - int(keepbits)
    if maskbits <= 0:
        return x
    b = x.contiguous().view(torch.int32)
    b = b + (((b >> maskbits) & 1) + ((1 << (maskbits - 1)) - 1))
    return (b & ~((1 << maskbits) - 1)).view(torch.float32)


def _count_float16(x: Tensor, h: Tensor, stats: dict[str, int]) -> None:
    a = x.abs()
    nz = int(torch.count_nonzero(a))
    stats["nonzero"] = stats.get("nonzero", 0) + nz
    normal = int(torch.count_nonzero(a >= FLOAT16_MIN_NORMAL))
    stats["below_normal"] = stats.get("below_normal", 0) + nz - normal
    stats["flushed"] = stats.get("flushed", 0) + nz - int(torch.count_nonzero(h))
    stats["clamped"] = stats.get("clamped", 0) + int(torch.count_nonzero(a > FLOAT16_MAX))


def to_storage(x: Tensor, dtype: str, keepbits: int | None, stats: dict[str, int] | None = None) -> Tensor:
    """A float tensor in storage ``dtype``, on its own device. A tensor already in that dtype is
    returned as it is (it was converted before, e.g. on the detector's device).

    float16 clamps to +-65504 (no inf on disk); bfloat16 is bit-rounded here when ``keepbits`` is set
    (float16/float32 are bit-rounded by the array's BitRound filter). ``stats`` (float16 only)
    accumulates ``nonzero``, ``below_normal`` (0 < |x| < 2^-14: precision lost), ``flushed`` (became 0)
    and ``clamped`` (|x| > 65504) counts.
    """
    if dtype not in TORCH_DTYPES:
        raise MfdetrError(f"unknown storage dtype {dtype!r}")
    if x.dtype == TORCH_DTYPES[dtype]:
        return x.detach()
    x = x.detach().float()
    if dtype == "float32":
        return x
    if dtype == "float16":
        h = x.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        if stats is not None:
            _count_float16(x, h, stats)
        return h
    if keepbits is not None:
        x = bitround(x, keepbits)
    return x.to(torch.bfloat16)


def encode_float(
    x: Tensor, dtype: str, keepbits: int | None, stats: dict[str, int] | None = None
) -> np.ndarray:
    """float tensor -> the on-disk numpy array for storage ``dtype`` (see schema.STORAGE_DTYPES and
    ``to_storage``): float16/float32 as they are, bfloat16 as uint16 bit patterns."""
    h = to_storage(x, dtype, keepbits, stats).to("cpu")
    if dtype == "bfloat16":
        return h.view(torch.int16).numpy().view(np.uint16)
    return h.numpy()


def decode_float(a: np.ndarray, dtype: str) -> Tensor:
    """On-disk numpy array -> float32 tensor (inverse of ``encode_float``)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def float16_warnings(stats: dict[str, dict[str, int]], threshold: float = 0.01) -> list[str]:
    """Human warnings for arrays whose float16 storage lost much (see ``to_storage`` stats)."""
    out = []
    for name, st in stats.items():
        nz = max(1, st.get("nonzero", 0))
        below, flushed, clamped = st.get("below_normal", 0), st.get("flushed", 0), st.get("clamped", 0)
        if below / nz > threshold or clamped / nz > 1e-4:
            out.append(
                f"{name}: {100 * below / nz:.1f}% of its non-zero values are below float16's normal range "
                f"(|x| < 6.1e-05; {100 * flushed / nz:.1f}% became 0) and {clamped} exceeded 65504 (clamped): "
                "float16 loses this level; extract with --dtype bfloat16 (float32's range) or float32"
            )
    return out


def merge_stats(into: dict[str, dict[str, int]], other: dict[str, dict[str, int]]) -> None:
    """Add ``other``'s float16 counts into ``into`` (statistics gathered in several processes)."""
    for name, st in other.items():
        acc = into.setdefault(name, {})
        for key, v in st.items():
            acc[key] = acc.get(key, 0) + v
