"""The cache schema: extraction options, the group attributes and every array's layout.

A cache is a Zarr v3 group (docs/DESIGN.md, "Cache"). This module is the one place that knows
array names, shapes, dtypes, chunking, sharding and codecs; the writer (``writer.py``), the reader
(``reader.py``) and ``inspect.py`` all go through it.

Layout rules:
- axis 0 of every array is the image position ``i`` (the dataset's sorted image-id order);
- a *block* is ``options.block`` consecutive positions; one writer owns a whole block and writes
  each of its arrays once, then ``done`` (Zarr rewrites a shard whole on every write, so two
  writers into one shard lose data);
- big per-image arrays (boxes .. mask_targets, the feature maps) have one image per chunk and one
  block per shard, so a reader fetches one image with a ranged read;
- small per-image arrays (ids, sizes, flags) have one block per chunk and no sharding: a reader
  that wants one image reads a few dozen bytes more, and the store holds far fewer objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mfdetr.errors import MfdetrError

SCHEMA_VERSION = 1
ATTR_KEY = "mfdetr"  # group attribute holding the metadata dict (written last at creation)
INCOMPLETE_KEY = "mfdetr_incomplete"  # group attribute while the arrays are being created
FEAT_GROUP = "feat"
QPARAM_GROUP = "qparams"  # per-image quantization parameters of quant="int8"

# storage dtype name -> (numpy dtype on disk, max BitRound keepbits)
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("float32", 23),
    "float16": ("float16", 10),
    "bfloat16": ("uint16", 7),  # bfloat16 bit patterns; the array attribute says so
}
CODECS = ("zstd", "lz4", "blosc-zstd", "none")
FLOAT16_MAX = 65504.0

# Zarr warns that numcodecs codecs (BitRound) and consolidated metadata are outside the v3 spec;
# both are deliberate here (zarr-python reads them), so the warnings are noise for users.
_QUIET = (
    "Numcodecs codecs are not in the Zarr version 3",
    "Consolidated metadata is currently not part",
    "is not recognized as a component of a Zarr hierarchy",  # a concurrent writer's temporary file
)
for _m in _QUIET:
    warnings.filterwarnings("ignore", message=_m)


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence the two deliberate-choice warnings above (also where filters were reset, e.g. pytest)."""
    with warnings.catch_warnings():
        for m in _QUIET:
            warnings.filterwarnings("ignore", message=m)
        yield


@dataclass
class MatchOptions:
    """How predicted boxes are assigned to ground truth (see ``mfdetr.extract.matching``).

    rule: "iou" (default): each kept box takes the non-crowd GT of highest box IoU when that IoU is
        >= iou_threshold (one-to-many, as Mask R-CNN assigns mask targets);
        "hungarian": one-to-one DETR assignment (class + L1 + GIoU cost), pairs below
        iou_threshold dropped.
    iou_threshold: minimum box IoU of a match (0.5).
    """

    rule: Literal["iou", "hungarian"] = "iou"
    iou_threshold: float = 0.5


@dataclass
class ExtractOptions:
    """What `mfdetr extract` stores and how (all part of the cache fingerprint).

    topk: boxes kept per image (K of the arrays; the detector is built with this top-k).
    levels: feature level names to keep (None = the detector's default levels); ``pxN`` adds the network-input
        RGB at stride N (``mfdetr/detectors/pixels.py``).
    dtype: storage dtype of queries and feature maps: float16 | bfloat16 | float32. float16 values
        beyond +-65504 are clamped to it.
    codec: compressor of every array: blosc-zstd (Blosc zstd, byte shuffle; the default: as small as
        plain zstd 3 or smaller, at about half its CPU, so the writers keep up with a GPU) | zstd |
        lz4 (Blosc, byte shuffle) | none.
    codec_level: compression level (None = the codec's default: blosc-zstd 1, zstd 3, lz4 5).
    keepbits: BitRound mantissa bits kept in queries and features (None = lossless storage);
        at most 10 for float16, 7 for bfloat16, 23 for float32.
    mask_size: side M of the stored mask targets (multiple of 8).
    match: the matching rule (see MatchOptions).
    block: images per shard; one writer owns whole blocks (the unit of work, resume and ownership).
        None = auto (``auto_block``): the power of two giving about 32 MB of uncompressed
        features per shard, between 8 and 64; the resolved value is what the cache records.
    Storage levers (``mfdetr/cache/storage.py``; recorded only when set, so older fingerprints hold):
    quant: None | "int8" (affine per image and channel) | "int8-calib" (per channel, calibrated once)
        quantization of the feature maps to ``quant_bits`` bits (2..8) stored as uint8.
    project: {level: width}: PCA projection of a level to ``width`` channels (fitted at the start).
    box_mask: levels kept only inside the union of the kept boxes grown by ``box_margin`` cells.
    calib_images: images of the calibration sample (the first ones) for project / int8-calib.
    """

    topk: int = 100
    levels: list[str] | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    codec: Literal["zstd", "lz4", "blosc-zstd", "none"] = "blosc-zstd"
    codec_level: int | None = None
    keepbits: int | None = None
    mask_size: int = 64
    match: MatchOptions = field(default_factory=MatchOptions)
    block: int | None = None
    quant: Literal["int8", "int8-calib"] | None = None
    quant_bits: int = 8
    project: dict[str, int] | None = None
    box_mask: list[str] | None = None
    box_margin: int = 2
    calib_images: int = 16

    def validate(self) -> ExtractOptions:
        """Raise MfdetrError on an inconsistent option; return self."""
        if self.topk < 1:
            raise MfdetrError(f"topk must be >= 1, got {self.topk}")
        if self.dtype not in STORAGE_DTYPES:
            raise MfdetrError(f"dtype {self.dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        if self.codec not in CODECS:
            raise MfdetrError(f"codec {self.codec!r} is not one of {list(CODECS)}")
        if self.keepbits is not None:
            kmax = STORAGE_DTYPES[self.dtype][1]
            if not 0 <= self.keepbits <= kmax:
                raise MfdetrError(
                    f"keepbits must be in 0..{kmax} for dtype {self.dtype}, got {self.keepbits}"
                )
        if self.mask_size < 8 or self.mask_size % 8:
            raise MfdetrError(f"mask_size must be a positive multiple of 8, got {self.mask_size}")
        if self.block is not None and self.block < 1:
            raise MfdetrError(f"block must be >= 1, got {self.block}")
        if self.match.rule not in ("iou", "hungarian"):
            raise MfdetrError(f"match.rule must be 'iou' or 'hungarian', got {self.match.rule!r}")
        if not 0.0 <= self.match.iou_threshold <= 1.0:
            raise MfdetrError(f"match.iou_threshold must be in [0, 1], got {self.match.iou_threshold}")
        if self.levels is not None and len(self.levels) == 0:
            raise MfdetrError("levels must name at least one level (or be left unset for the default)")
        self._validate_storage()
        return self

    def _validate_storage(self) -> None:
        if self.quant is not None and self.quant not in QUANT_MODES:
            raise MfdetrError(f"quant {self.quant!r} is not one of {list(QUANT_MODES)} (or unset)")
        if not 2 <= self.quant_bits <= 8:
            raise MfdetrError(f"quant_bits must be in 2..8, got {self.quant_bits}")
        for name, width in (self.project or {}).items():
            if not isinstance(width, int) or width < 1:
                raise MfdetrError(f"project.{name} must be a positive channel count, got {width!r}")
        if self.box_margin < 0:
            raise MfdetrError(f"box_margin must be >= 0 cells, got {self.box_margin}")
        if self.calib_images < 1:
            raise MfdetrError(f"calib_images must be >= 1, got {self.calib_images}")
        if self.levels is not None:
            for key, names in (("project", list(self.project or {})), ("box_mask", self.box_mask or [])):
                bad = [n for n in names if n not in self.levels]
                if bad:
                    raise MfdetrError(f"{key} names level(s) {bad} that are not in levels {self.levels}")

    def to_attrs(self) -> dict[str, Any]:
        """JSON dict stored in the group attributes (and hashed into the fingerprint). Storage levers
        at their defaults are left out, so caches made before they existed keep their fingerprints."""
        d = dataclasses.asdict(self)
        for key, default in _STORAGE_DEFAULTS.items():
            if d[key] == default or (key in ("project", "box_mask") and not d[key]):
                del d[key]
        if not d.get("quant"):
            d.pop("quant_bits", None)
        if not (d.get("project") or d.get("quant") == "int8-calib"):
            d.pop("calib_images", None)
        if not d.get("box_mask"):
            d.pop("box_margin", None)
        return d


QUANT_MODES = ("int8", "int8-calib")
_STORAGE_DEFAULTS = {"quant": None, "quant_bits": 8, "project": None, "box_mask": None}


AUTO_BLOCK_BYTES = 32 << 20
AUTO_BLOCK_RANGE = (8, 64)


def auto_block(
    levels: list[dict[str, Any]],
    padded: dict[str, list[int]],
    topk: int,
    query_dim: int,
    dtype: str,
    feat_itemsize: int | None = None,
) -> int:
    """Block size for ``block=None``: the largest power of two with <= 32 MB of (uncompressed,
    padded, storage-dtype) feature maps + queries per shard, clamped to 8..64 images."""
    itemsize = 4 if dtype == "float32" else 2
    fsize = itemsize if feat_itemsize is None else feat_itemsize
    per_image = itemsize * topk * query_dim + fsize * sum(
        int(lv["channels"]) * padded[lv["name"]][0] * padded[lv["name"]][1] for lv in levels
    )
    lo, hi = AUTO_BLOCK_RANGE
    b = lo
    while b * 2 <= hi and b * 2 * per_image <= AUTO_BLOCK_BYTES:
        b *= 2
    return b


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache: where it lives and how it is laid out on disk."""

    name: str  # path inside the group, e.g. "boxes" or "feat/e8"
    shape: tuple[int, ...]
    dtype: str  # numpy dtype on disk
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    fill_value: Any
    lossy: bool  # BitRound applies (queries, features)
    attributes: dict[str, Any] = field(default_factory=dict)


def padded_sizes(input_sizes: list[tuple[int, int]], levels: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per level the largest true map size (ceil(h_in/s), ceil(w_in/s)) over the network inputs."""
    out = {}
    for lv in levels:
        s = int(lv["stride"])
        h = max((math.ceil(hi / s) for hi, _ in input_sizes), default=1)
        w = max((math.ceil(wi / s) for _, wi in input_sizes), default=1)
        out[lv["name"]] = [max(1, h), max(1, w)]
    return out


def array_specs(meta: dict[str, Any]) -> list[ArraySpec]:
    """Every array of a cache, given its group metadata (the ``mfdetr`` attribute)."""
    n = int(meta["dataset"]["num_images"])
    opts = meta["options"]
    k = int(opts["topk"])
    b = int(opts["block"])
    m = int(opts["mask_size"])
    d = int(meta["detector"]["query_dim"])
    levels = meta["detector"]["levels"]
    nl = len(levels)
    store_dtype = STORAGE_DTYPES[opts["dtype"]][0]
    logical = {"mfdetr_dtype": opts["dtype"]}

    def small(name, tail, dtype, fill=0):
        return ArraySpec(name, (n, *tail), dtype, (b, *tail), None, fill, False)

    def big(name, tail, dtype, fill=0, lossy=False, attributes=None):
        return ArraySpec(name, (n, *tail), dtype, (1, *tail), (b, *tail), fill, lossy, attributes or {})

    specs = [
        small("image_id", (), "int64"),
        small("orig_size", (2,), "int32"),
        small("input_size", (2,), "int32"),
        small("scale", (2,), "float32"),
        small("num_boxes", (), "int32"),
        small("feat_size", (nl, 2), "int32"),
        big("boxes", (k, 4), "float32"),
        big("scores", (k,), "float32"),
        big("labels", (k,), "int64", fill=-1),
        big("queries", (k, d), store_dtype, lossy=True, attributes=logical),
    ]
    quant = opts.get("quant")
    feat_dtype = "uint8" if quant else store_dtype
    feat_attrs = {**logical, "mfdetr_quant": quant} if quant else logical
    for lv in levels:
        h, w = meta["padded"][lv["name"]]
        specs.append(
            big(
                f"{FEAT_GROUP}/{lv['name']}",
                (int(lv["channels"]), h, w),
                feat_dtype,
                lossy=not quant,
                attributes=feat_attrs,
            )
        )
        if quant == "int8":  # per image and channel (lo, step)
            specs.append(big(f"{QPARAM_GROUP}/{lv['name']}", (int(lv["channels"]), 2), "float32"))
    specs += [
        big("match_ann_id", (k,), "int64", fill=-1),
        big("match_iou", (k,), "float32"),
        big("mask_targets", (k, m, m // 8), "uint8"),
        small("bad", (), "bool", fill=False),
        small("done", (), "bool", fill=False),
    ]
    return specs


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """Validate a group's ``mfdetr`` attribute; clear MfdetrError when absent or of another schema."""
    if not isinstance(meta, dict):
        raise MfdetrError(
            f"{where} is not an mfdetr cache (no '{ATTR_KEY}' group attribute); "
            "point at a store written by `mfdetr extract`"
        )
    ver = meta.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise MfdetrError(
            f"{where} has cache schema version {ver!r}, this mfdetr reads version {SCHEMA_VERSION}; "
            "re-extract it with this mfdetr version"
        )
    for key in ("fingerprint", "detector", "dataset", "options", "padded"):
        if key not in meta:
            raise MfdetrError(f"{where}: cache metadata lacks {key!r} (corrupt store?)")
    return meta


def _float_factor(dtype: str, keepbits: int | None, codec: str) -> float:
    """Assumed compressed / uncompressed ratio of float maps: lossless codecs barely shrink float
    activations (1.0); BitRound keeps sign + exponent + keepbits of the bits, which zstd finds."""
    if keepbits is None or codec == "none":
        return 1.0
    exp = {"float16": 5, "bfloat16": 8, "float32": 8}[dtype]
    return (1 + exp + int(keepbits)) / (8 * np.dtype(STORAGE_DTYPES[dtype][0]).itemsize)


def estimate_image_bytes(
    levels: list[dict[str, Any]], input_size: tuple[int, int], query_dim: int, opts: dict[str, Any]
) -> dict[str, float]:
    """Estimated stored bytes of one image's arrays, from the schema's dtypes and shapes: feature maps at
    their true size for ``input_size`` (``levels`` with the STORED channel counts, i.e. after any
    projection), queries, per-box arrays, bit-packed mask targets, quantization parameters. Upper
    bound for box masking (the kept-box area is data dependent). Keys: array names, and "total"."""
    dtype, codec = opts["dtype"], opts["codec"]
    item = np.dtype(STORAGE_DTYPES[dtype][0]).itemsize
    ffac = _float_factor(dtype, opts.get("keepbits"), codec)
    quant = opts.get("quant")
    qfac = 1.0 if codec == "none" or not quant else int(opts.get("quant_bits", 8) or 8) / 8
    k, m = int(opts["topk"]), int(opts["mask_size"])
    out: dict[str, float] = {
        "queries": k * query_dim * item * ffac,
        "boxes+scores+labels+match": k * (16 + 4 + 8 + 8 + 4),
        "mask_targets": k * m * (m // 8),
    }
    h_in, w_in = input_size
    for lv in levels:
        s, c = int(lv["stride"]), int(lv["channels"])
        cells = c * math.ceil(h_in / s) * math.ceil(w_in / s)
        out[f"{FEAT_GROUP}/{lv['name']}"] = cells * (qfac if quant else item * ffac)
        if quant == "int8":
            out[f"{QPARAM_GROUP}/{lv['name']}"] = c * 8
    out["total"] = float(sum(out.values()))
    return out
