"""Storage dtype conversion: float tensors <-> the arrays a cache stores (float16, bfloat16, float32)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mfdetr.cache.schema import FLOAT16_MAX
from mfdetr.errors import MfdetrError

FLOAT16_MIN_NORMAL = 2.0**-14


def encode_float(
    x: Tensor, dtype: str, keepbits: int | None, stats: dict[str, int] | None = None
) -> np.ndarray:
    """float tensor -> the on-disk numpy array for storage ``dtype`` (see schema.STORAGE_DTYPES).

    float16 clamps to +-65504 (no inf on disk); bfloat16 becomes uint16 bit patterns, bit-rounded
    here when ``keepbits`` is set (float16/float32 are bit-rounded by the array's BitRound filter).
    ``stats`` (float16 only) accumulates ``nonzero``, ``below_normal`` (0 < |x| < 2^-14: precision
    lost), ``flushed`` (became 0) and ``clamped`` (|x| > 65504) counts.
    """
    x = x.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return x.numpy()
    if dtype == "float16":
        h = x.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        if stats is not None:
            a = x.abs()
            nz = int(torch.count_nonzero(a))
            stats["nonzero"] = stats.get("nonzero", 0) + nz
            normal = int(torch.count_nonzero(a >= FLOAT16_MIN_NORMAL))
            stats["below_normal"] = stats.get("below_normal", 0) + nz - normal
            stats["flushed"] = stats.get("flushed", 0) + nz - int(torch.count_nonzero(h))
            stats["clamped"] = stats.get("clamped", 0) + int(torch.count_nonzero(a > FLOAT16_MAX))
        return h.numpy()
    if dtype == "bfloat16":
        if keepbits is not None:
            import numcodecs

            rounded = (
                numcodecs.BitRound(int(keepbits)).encode(np.ascontiguousarray(x.numpy())).view(np.float32)
            )
            x = torch.from_numpy(np.array(rounded, dtype=np.float32).reshape(x.shape))
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raise MfdetrError(f"unknown storage dtype {dtype!r}")


def decode_float(a: np.ndarray, dtype: str) -> Tensor:
    """On-disk numpy array -> float32 tensor (inverse of ``encode_float``)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def float16_warnings(stats: dict[str, dict[str, int]], threshold: float = 0.01) -> list[str]:
    """Human warnings for arrays whose float16 storage lost much (see ``encode_float`` stats)."""
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
