"""Storage levers beyond dtype / codec / BitRound: what is stored, decoded back transparently.

Per feature level, the writer applies (in this order) and the reader undoes:

1. projection (``options.project = {level: width}``): a fixed linear map ``y = B^T (x - mu)``
   from the level's C channels to ``width``, PCA fitted once on a calibration sample of images at the
   start of extraction and stored in the cache metadata. It is NOT undone: the mask network sees the
   projected width (its first 1x1 mapper composes with B, a linear map after a linear map), and the
   cache's level ``channels`` is the projected width. Error: the PCA residual (explained variance).
2. box masking (``options.box_mask = [levels]``): values kept only inside the union of the image's
   kept boxes grown by ``box_margin`` cells; exact zeros elsewhere (which compress to almost nothing).
   The reader recomputes the region from the stored boxes, so zeros stay exact under quantization.
3. affine quantization (``options.quant``) to ``quant_bits`` (<= 8) bits stored as uint8:
   ``q = round((x - lo) / step)``, ``x_hat = lo + q * step`` with per channel (lo, step) either per image
   (``int8``: from that image's min / max, stored in ``qparams/<level>``; error <= step / 2) or
   calibrated once over the sample (``int8-calib``: stored in the metadata; values outside the
   calibrated range are clamped). Decoded values are rounded to the cache's storage dtype, so a
   preloaded (16-bit) record equals a streamed one bit for bit.

Calibration data lives in the ``storage`` entry of the cache metadata as base64 float32 arrays.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_json

PCA_MAX_PIXELS = 200_000  # pixels per level used to fit the projection (evenly strided sample)
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def needs_calibration(opts: dict[str, Any]) -> bool:
    """True when the options need a calibration pass (a projection or calibrated quantization)."""
    return bool(opts.get("project")) or opts.get("quant") == "int8-calib"


def pack(a: np.ndarray) -> dict[str, Any]:
    """A float32 array as a JSON-safe dict (exact round trip)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32).reshape(d["shape"]).copy()


# ---------------------------------------------------------------------------------------------
# numeric pieces


def fit_pca(maps: list[Tensor], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [C], basis [C, width]) of the principal components of the pixels of ``maps`` ([C,h,w] each),
    fitted in float64 on an evenly strided sample of at most ``PCA_MAX_PIXELS`` pixels; each component's
    sign is fixed (largest |entry| positive) so the result is deterministic."""
    x = torch.cat([m.detach().double().reshape(m.shape[0], -1) for m in maps], dim=1)  # [C, N]
    c, n = x.shape
    if width > c:
        raise MfdetrError(f"projection width {width} exceeds the level's {c} channels")
    step = max(1, math.ceil(n / PCA_MAX_PIXELS))
    x = x[:, ::step]
    mu = x.mean(dim=1)
    xc = x - mu[:, None]
    cov = xc @ xc.T / max(1, xc.shape[1] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    basis = evecs[:, torch.argsort(evals, descending=True)[:width]]
    idx = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[idx, torch.arange(width)])
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    return mu.float().numpy(), basis.float().numpy()


def project(x: Tensor, mean: np.ndarray, basis: np.ndarray) -> Tensor:
    """[C,h,w] -> [width,h,w]: ``B^T (x - mu)`` in float32."""
    c, h, w = x.shape
    flat = x.float().reshape(c, -1) - torch.from_numpy(mean)[:, None]
    return (torch.from_numpy(basis).T @ flat).reshape(-1, h, w)


def box_region(
    boxes: np.ndarray, n: int, scale: tuple[float, float], stride: int, hw: tuple[int, int], margin: int
) -> Tensor:
    """bool [h,w]: the cells of a stride-``stride`` map covered by the first ``n`` boxes (original px,
    x0 y0 x1 y1; ``scale`` = input px per original px), each grown by ``margin`` cells."""
    h, w = hw
    region = torch.zeros((h, w), dtype=torch.bool)
    sx, sy = float(scale[0]), float(scale[1])
    for x0, y0, x1, y1 in np.asarray(boxes[:n], dtype=np.float64):
        c0 = max(0, math.floor(x0 * sx / stride) - margin)
        r0 = max(0, math.floor(y0 * sy / stride) - margin)
        c1 = min(w, math.ceil(x1 * sx / stride) + margin)
        r1 = min(h, math.ceil(y1 * sy / stride) + margin)
        if c1 > c0 and r1 > r0:
            region[r0:r1, c0:c1] = True
    return region


def quant_params(x: Tensor, bits: int, region: Tensor | None = None) -> np.ndarray:
    """float32 [C, 2] = (lo, step) per channel from the min / max of ``x`` [C,h,w] (inside ``region``)."""
    flat = x.float().reshape(x.shape[0], -1)
    if region is not None:
        flat = flat[:, region.reshape(-1)]
    if flat.shape[1] == 0:
        return np.stack([np.zeros(x.shape[0]), np.ones(x.shape[0])], axis=1).astype(np.float32)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return ranges_to_params(lo.numpy(), hi.numpy(), bits)


def ranges_to_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    lo = lo.astype(np.float32)
    step = ((hi.astype(np.float32) - lo) / np.float32(2**bits - 1)).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    return np.stack([lo, step], axis=1).astype(np.float32)


def quantize(x: Tensor, params: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [C,h,w] codes of ``x`` under (lo, step) ``params`` [C,2]; out-of-range values clamp."""
    p = torch.from_numpy(params)
    q = torch.round((x.float() - p[:, 0, None, None]) / p[:, 1, None, None])
    return q.clamp_(0, 2**bits - 1).to(torch.uint8).numpy()


def dequantize(q: np.ndarray, params: np.ndarray) -> Tensor:
    """float32 [C,h,w] from uint8 codes and (lo, step) ``params`` [C,2]."""
    p = torch.from_numpy(np.asarray(params, dtype=np.float32))
    return torch.from_numpy(np.asarray(q)).float() * p[:, 1, None, None] + p[:, 0, None, None]


# ---------------------------------------------------------------------------------------------
# the per-cache codec


@dataclass
class LevelCodec:
    """How one level is stored (see the module doc)."""

    name: str
    stride: int
    mean: np.ndarray | None = None  # projection
    basis: np.ndarray | None = None
    box_mask: bool = False
    calib: np.ndarray | None = None  # int8-calib (lo, step) [C, 2]


class StorageCodec:
    """Encode (writer) / decode (reader) of the feature maps of one cache, built from its metadata."""

    def __init__(self, meta: dict[str, Any]) -> None:
        opts = meta["options"]
        self.quant = opts.get("quant")
        self.bits = int(opts.get("quant_bits", 8) or 8)
        self.margin = int(opts.get("box_margin", 2) or 0)
        self.dtype = opts["dtype"]
        st = meta.get("storage") or {}
        masked = set(opts.get("box_mask") or [])
        bases = unpack_projection(st.get("project"))
        self.levels: dict[str, LevelCodec] = {}
        for lv in meta["detector"]["levels"]:
            name = lv["name"]
            lc = LevelCodec(name, int(lv["stride"]), box_mask=name in masked)
            lc.mean, lc.basis = bases.get(name, (None, None))
            cal = st.get("quant", {}).get(name)
            if cal is not None:
                lc.calib = unpack(cal)
            if self.quant == "int8-calib" and lc.calib is None:
                raise MfdetrError(
                    f"cache metadata lacks the int8 calibration of level {name!r} (corrupt store?)"
                )
            if (opts.get("project") or {}).get(name) and lc.basis is None:
                raise MfdetrError(f"cache metadata lacks the projection of level {name!r} (corrupt store?)")
            self.levels[name] = lc
        self.active = bool(self.quant or masked or st.get("project"))

    def region(self, name: str, boxes: np.ndarray, n: int, scale: Any, hw: tuple[int, int]) -> Tensor | None:
        lc = self.levels[name]
        if not lc.box_mask:
            return None
        return box_region(boxes, n, scale, lc.stride, hw, self.margin)

    def pre(
        self, name: str, x: Tensor, boxes: np.ndarray, n: int, scale: Any
    ) -> tuple[Tensor, Tensor | None]:
        """Projection + box masking of one float map; (map, region or None)."""
        lc = self.levels[name]
        x = x.float()
        if lc.basis is not None:
            x = project(x, lc.mean, lc.basis)
        reg = self.region(name, boxes, n, scale, (int(x.shape[1]), int(x.shape[2])))
        if reg is not None:
            x = x * reg
        return x, reg

    def quantize(self, name: str, x: Tensor, reg: Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 codes, per-image params or None) of a pre-processed map."""
        lc = self.levels[name]
        params = lc.calib if self.quant == "int8-calib" else quant_params(x, self.bits, reg)
        q = quantize(x, params, self.bits)
        if reg is not None:
            q = q * reg.numpy().astype(np.uint8)  # constant outside the boxes: compresses away
        return q, (params if self.quant == "int8" else None)

    def decode(
        self,
        name: str,
        raw: Any,
        params: np.ndarray | None,
        boxes: np.ndarray,
        n: int,
        scale: Any,
        quantized: bool = True,
    ) -> Tensor:
        """float32 map from the cropped stored array: uint8 codes (``quantized``) or the decoded float map."""
        lc = self.levels[name]
        if quantized:
            x = dequantize(raw, lc.calib if params is None else params)
            x = x.to(_TORCH[self.dtype]).float()  # the cache's storage precision (see module doc)
        else:
            x = raw
        reg = self.region(name, boxes, n, scale, (int(x.shape[1]), int(x.shape[2])))
        if reg is not None:
            x = x * reg
        return x


def calibrate(
    opts: dict[str, Any], levels: list[dict[str, Any]], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``storage`` metadata entry: projections and int8-calib ranges from sample detector outputs.

    samples: per image {"features": {name: [C,h,w]}, "boxes": [K,4] np, "n": int, "scale": (sx, sy)}.
    """
    if not samples:
        raise MfdetrError(
            "storage calibration needs at least one image (calib_images >= 1 and a non-empty dataset)"
        )
    out: dict[str, Any] = {"calib_images": len(samples), "project": {}, "quant": {}}
    widths = opts.get("project") or {}
    names = [lv["name"] for lv in levels]
    for name in widths:
        if name not in names:
            raise MfdetrError(f"project: level {name!r} is not stored (levels {names})")
    partial = {"project": {}, "quant": {}}
    for name, wd in widths.items():
        mu, basis = fit_pca([s["features"][name] for s in samples], int(wd))
        out["project"][name] = {"mean": pack(mu), "basis": pack(basis)}
    partial["project"] = out["project"]
    if opts.get("quant") == "int8-calib":
        codec = StorageCodec(
            {"options": {**opts, "quant": "int8"}, "detector": {"levels": levels}, "storage": partial}
        )
        bits = int(opts.get("quant_bits", 8))
        for name in names:
            lo = hi = None
            for s in samples:
                x, reg = codec.pre(name, s["features"][name], s["boxes"], s["n"], s["scale"])
                flat = x.reshape(x.shape[0], -1)
                if reg is not None:
                    flat = flat[:, reg.reshape(-1)]
                if flat.shape[1] == 0:
                    continue
                a, b = flat.min(dim=1).values.numpy(), flat.max(dim=1).values.numpy()
                lo = a if lo is None else np.minimum(lo, a)
                hi = b if hi is None else np.maximum(hi, b)
            if lo is None:
                c = int(widths.get(name) or next(lv["channels"] for lv in levels if lv["name"] == name))
                lo, hi = np.zeros(c, np.float32), np.ones(c, np.float32)
            out["quant"][name] = pack(ranges_to_params(lo, hi, bits))
    return out


def stored_calibration(path: str, fingerprint: str) -> dict[str, Any] | None:
    """The ``storage`` entry of the cache at ``path`` when it is this fingerprint's (a resume reads the
    calibration back instead of fitting it again); None when there is no such finished store."""
    import zarr

    from mfdetr.cache.schema import ATTR_KEY, quiet_zarr
    from mfdetr.cache.writer import store_arg

    try:
        with quiet_zarr():
            g = zarr.open_group(store_arg(path), mode="r", zarr_format=3)
            meta = g.attrs.get(ATTR_KEY)
    except Exception:  # nothing there (yet), or not a Zarr group: creation reports it properly
        return None
    if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint and meta.get("storage"):
        return meta["storage"]
    return None


def projection_id(storage: dict[str, Any] | None) -> str | None:
    """Identity of a cache's projections (a hash of their means and bases), None when no level is
    projected. A mask network reads projected coefficients: its train and val caches must share it."""
    proj = (storage or {}).get("project") or {}
    if not proj:
        return None
    return sha256_json(proj)[:16]


def unpack_projection(projection: dict[str, Any] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{level: (mean, basis)}`` of a storage entry's ``project`` (as a checkpoint records it)."""
    return {name: (unpack(e["mean"]), unpack(e["basis"])) for name, e in (projection or {}).items()}


def project_features(
    features: dict[str, Tensor], bases: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, Tensor]:
    """Live detector maps in a cache's projected bases (``bases``: ``unpack_projection``'s result): what
    the reader returns for a projected cache, before quantization."""
    if not bases:
        return features
    out = dict(features)
    for name, (mean, basis) in bases.items():
        out[name] = project(features[name].float().cpu(), mean, basis)
    return out


def check_same_projection(
    want: str | None, have_storage: dict[str, Any] | None, what: str, source: str
) -> None:
    """Refuse ``what`` (a cache) when its projections are not ``want`` (the id those of ``source``, the
    train cache or a checkpoint, have): the network would read coefficients in other bases."""
    have = projection_id(have_storage)
    if want == have:
        return
    raise MfdetrError(
        f"{what} stores its levels in other PCA bases ({have or 'not projected'}) than {source} "
        f"({want or 'not projected'}): the mask network would read other coefficients. Extract it with "
        "`mfdetr extract ... --calib-from TRAIN_CACHE` (same options; `mfdetr run` does this for the val split)"
    )


def calibration_id(storage: dict[str, Any]) -> str:
    """Identity of a whole calibration (projections and int8 ranges), part of the fingerprint of a
    cache that adopts another's (``extract --calib-from``)."""
    return sha256_json({k: storage.get(k) for k in ("project", "quant")})[:16]


# options a calibration depends on: a cache adopts another's only when they agree on all of them
CALIB_OPTIONS = ("levels", "project", "quant", "quant_bits", "box_mask", "box_margin", "calib_images")


def calibration_from(path: str, detector_fp: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``storage`` entry of the finished cache at ``path``, for a new cache of the same detector and
    storage options (e.g. the val split adopts the train cache's PCA bases, so one mask network reads
    both). MfdetrError naming what differs otherwise."""
    import zarr

    from mfdetr.cache.schema import ATTR_KEY, quiet_zarr
    from mfdetr.cache.writer import store_arg

    try:
        with quiet_zarr():
            meta = zarr.open_group(store_arg(path), mode="r", zarr_format=3).attrs.get(ATTR_KEY)
    except Exception as e:
        raise MfdetrError(
            f"--calib-from {path}: not a readable mfdetr cache ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(meta, dict) or not meta.get("storage"):
        raise MfdetrError(
            f"--calib-from {path}: that cache holds no storage calibration (it was extracted without "
            "--project / --quant int8-calib, or its creation did not finish)"
        )
    src_fp = (meta.get("detector") or {}).get("fingerprint")
    if src_fp != detector_fp:
        raise MfdetrError(
            f"--calib-from {path}: made by detector fingerprint {str(src_fp)[:12]}, this extraction's is "
            f"{detector_fp[:12]}: a calibration is only valid for the detector that produced it"
        )
    src = meta.get("options") or {}
    diff = [k for k in CALIB_OPTIONS if src.get(k) != options.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {src.get(k)!r} there, {options.get(k)!r} here" for k in diff)
        raise MfdetrError(
            f"--calib-from {path}: storage options differ ({shown}); extract with the same ones"
        )
    return meta["storage"]


def parse_project(text: str | None) -> dict[str, int] | None:
    """``"b4=32,e8=64"`` -> {"b4": 32, "e8": 64}; None / "" -> None."""
    if not text:
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, _, width = part.partition("=")
        try:
            out[name.strip()] = int(width)
        except ValueError:
            raise MfdetrError(f"--project must look like 'b4=32,e8=64' (level=width), got {text!r}") from None
    return out or None
