"""Reading a cache: ``open_cache`` and ``CacheDataset`` (a torch Dataset over the DONE images).

Works on local paths and fsspec URLs (``http://``, ``s3://``, ``memory://``, ...): arrays are opened
by name (plus consolidated metadata when present), so a plain HTTP server without directory
listing is enough. A dataset pickles without its open store and reopens it lazily in each
DataLoader worker. One record = the arrays of one image, every array fetched concurrently.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from mfdetr.cache.batch import collate_records
from mfdetr.cache.floats import decode_float
from mfdetr.cache.guard import DamagedCacheError, GuardedStore, describe, open_checks, repair_hint
from mfdetr.cache.schema import ATTR_KEY, FEAT_GROUP, QPARAM_GROUP, check_meta, quiet_zarr
from mfdetr.cache.storage import StorageCodec
from mfdetr.cache.writer import store_arg
from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError

_BASE = (
    "image_id",
    "orig_size",
    "input_size",
    "scale",
    "num_boxes",
    "feat_size",
    "boxes",
    "scores",
    "labels",
    "queries",
)
_TARGETS = ("match_ann_id", "match_iou", "mask_targets")


@quiet_zarr()
def open_cache(path: Any, mode: str = "r") -> zarr.Group:
    """Open a cache store read-only (default) and validate its ``mfdetr`` attribute.

    Raises MfdetrError for a missing store, a non-mfdetr store or another schema version.
    """
    where = str(path)
    try:
        store: Any = store_arg(where)
        if mode == "r" and where.startswith(("http://", "https://")):
            from mfdetr.cache.http import http_store

            store = http_store(where)
        g = zarr.open_group(store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise MfdetrError(f"no cache at {where} (no Zarr group there)") from e
    except Exception as e:  # unreachable URL, bad metadata, ...
        raise DamagedCacheError(
            f"cannot open cache {where}: its metadata file {where.rstrip('/')}/zarr.json is unreadable "
            f"({type(e).__name__}: {e}); if it was damaged, {repair_hint(where)}"
        ) from e
    check_meta(g.attrs.get(ATTR_KEY), where)
    return g


def cache_meta(group: zarr.Group) -> dict[str, Any]:
    """The validated ``mfdetr`` attribute of an open cache group."""
    return check_meta(group.attrs.get(ATTR_KEY), str(group.store))


async def _read_all(arrays: dict[str, Any], i: int) -> dict[str, np.ndarray]:
    names = list(arrays)
    vals = await asyncio.gather(*(arrays[n].getitem(i) for n in names))
    return dict(zip(names, vals))


class CacheDataset(Dataset):
    """A torch Dataset over the done (and not skipped) images of a cache.

    ``ds[j]`` is the record of the j-th done image (see ``mfdetr/cache/batch.py``): features
    cropped to their true size and decoded to float32, ``mask_targets`` unpacked to bool
    ``[K, M, M]`` (when ``load_targets``). ``ds.positions[j]`` is its image position in the
    dataset (= ``record["index"]``). Images that finish after the dataset was opened are not seen.
    """

    def __init__(self, path_or_url: Any, load_targets: bool = True, skip_damaged: bool = False) -> None:
        self.path = str(path_or_url)
        self.load_targets = bool(load_targets)
        self.skip_damaged = bool(skip_damaged)
        g = open_cache(self.path)
        self._meta = cache_meta(g)
        try:
            done = np.asarray(g["done"][:], dtype=bool)
            bad = np.asarray(g["bad"][:], dtype=bool)
        except Exception as e:
            raise DamagedCacheError(
                f"cache {self.path}: its done/bad flags cannot be read ({describe(e)}); "
                f"{repair_hint(self.path)}"
            ) from e
        self._guard = open_checks(g, self._meta, self.path, done, bad, self.skip_damaged)
        block = int(self._meta["options"]["block"])
        for b in self._guard.damaged:  # skip_damaged (else open_checks raised)
            done[b * block : (b + 1) * block] = False
        self.skipped_blocks = sorted(self._guard.damaged)
        self.skipped_records = 0  # records found damaged while reading (skip_damaged; this process)
        self.positions = np.flatnonzero(done & ~bad)
        self.num_images = int(self._meta["dataset"]["num_images"])
        self._group: zarr.Group | None = None  # opened (guarded) on first use
        self._pid = os.getpid()
        self._arrays: dict[str, Any] | None = None

    # -- metadata -----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """The cache's ``mfdetr`` metadata dict (detector, dataset, options, padded, fingerprint)."""
        return self._meta

    @property
    def levels(self) -> list[LevelSpec]:
        levels = self._meta["detector"]["levels"]
        return [LevelSpec.from_dict(lv) for lv in levels]

    @property
    def storage_codec(self) -> StorageCodec:
        """How the feature maps are stored (quantization, projection, box masking)."""
        if getattr(self, "_codec", None) is None:
            self._codec = StorageCodec(self._meta)
        return self._codec

    @property
    def query_dim(self) -> int:
        return int(self._meta["detector"]["query_dim"])

    @property
    def fingerprint(self) -> str:
        return str(self._meta["fingerprint"])

    @property
    def topk(self) -> int:
        return int(self._meta["options"]["topk"])

    @property
    def mask_size(self) -> int:
        return int(self._meta["options"]["mask_size"])

    @property
    def dtype(self) -> str:
        return str(self._meta["options"]["dtype"])

    @property
    def categories(self) -> list[dict[str, Any]]:
        return list(self._meta["dataset"]["categories"])

    @property
    def image_ids(self) -> list[int]:
        """Image ids of the done images, in dataset order (= ``ds[j]["image_id"]``)."""
        if not hasattr(self, "_image_ids"):
            try:
                ids = np.asarray(self._get_group()["image_id"].oindex[self.positions]) if len(self) else []
            except Exception as e:
                raise DamagedCacheError(
                    f"cache {self.path}: array image_id cannot be read ({describe(e)}); "
                    f"{repair_hint(self.path)}"
                ) from e
            self._image_ids = [int(v) for v in ids]
        return self._image_ids

    def collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``collate_records`` bound to this cache's levels (use as a DataLoader ``collate_fn``); drops
        the None records that ``skip_damaged`` returns for damaged images."""
        return collate_records([r for r in records if r is not None], self.levels)

    # -- pickling (DataLoader workers reopen the store lazily) ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_group"] = None
        state["_arrays"] = None
        return state

    def _get_group(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            # first use, or a forked DataLoader worker: never share the parent's store (its fsspec
            # filesystem may hold an HTTP session bound to the parent's event loop)
            g = open_cache(self.path)
            guard = GuardedStore(g.store, self._guard.index, self._guard.present)
            with quiet_zarr():
                self._group = zarr.open_group(guard, mode="r", zarr_format=3)
            self._arrays = None
            self._pid = os.getpid()
        return self._group

    @quiet_zarr()
    def _get_arrays(self) -> dict[str, Any]:
        self._get_group()
        if self._arrays is None:
            g = self._get_group()
            names = list(_BASE) + [f"{FEAT_GROUP}/{lv.name}" for lv in self.levels]
            if self._meta["options"].get("quant") == "int8":
                names += [f"{QPARAM_GROUP}/{lv.name}" for lv in self.levels]
            if self.load_targets:
                names += list(_TARGETS)
            self._arrays = {n: g[n]._async_array for n in names}
        return self._arrays

    # -- records --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> dict[str, Any]:
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        if not self.skip_damaged:
            return self.record_at(int(self.positions[j]))
        try:
            return self.record_at(int(self.positions[j]))
        except DamagedCacheError as e:
            import warnings

            self.skipped_records += 1
            warnings.warn(f"skipped a damaged record: {e}", stacklevel=2)
            return None  # type: ignore[return-value]

    def raw_at(self, position: int) -> dict[str, np.ndarray]:
        """The stored arrays of image ``position`` as on disk (features padded, dtype as stored)."""
        from zarr.core.sync import sync

        try:
            return sync(_read_all(self._get_arrays(), int(position)))
        except Exception as e:
            raise self._damage_error(int(position), e) from e

    def _damage_error(self, position: int, err: BaseException) -> DamagedCacheError:
        """Which arrays of image ``position`` fail (each read alone), in one line with the way out."""
        from zarr.core.sync import sync

        failed = []
        for name, arr in self._get_arrays().items():
            try:
                sync(arr.getitem(position))
            except Exception as e:
                failed.append((name, e))
        iid = "unknown"
        if "image_id" not in [n for n, _ in failed]:
            try:
                iid = str(int(sync(self._get_arrays()["image_id"].getitem(position))))
            except Exception:
                pass
        names = ", ".join(n for n, _ in failed) or "?"
        why = describe(failed[0][1] if failed else err)
        block = position // int(self._meta["options"]["block"])
        return DamagedCacheError(
            f"cache {self.path}: image id {iid} (position {position}, block {block}) is "
            f"damaged in array {names}: {why}; {repair_hint(self.path)}",
            [n for n, _ in failed],
            position,
        )

    def record_at(self, position: int) -> dict[str, Any]:
        """The record of image ``position`` (it should be done; see ``positions``)."""
        raw = self.raw_at(position)
        dtype = self.dtype
        sizes = np.asarray(raw["feat_size"])
        feats = {}
        codec = self.storage_codec
        for li, lv in enumerate(self.levels):
            h, w = int(sizes[li, 0]), int(sizes[li, 1])
            stored = np.asarray(raw[f"{FEAT_GROUP}/{lv.name}"])[:, :h, :w]
            if codec.quant or codec.levels[lv.name].box_mask:  # see mfdetr/cache/storage.py
                params = raw.get(f"{QPARAM_GROUP}/{lv.name}")
                feats[lv.name] = codec.decode(
                    lv.name,
                    stored if codec.quant else decode_float(stored, dtype),
                    None if params is None else np.asarray(params),
                    raw["boxes"],
                    int(raw["num_boxes"]),
                    raw["scale"],
                    quantized=bool(codec.quant),
                )
            else:
                feats[lv.name] = decode_float(stored, dtype)
        rec: dict[str, Any] = {
            "index": int(position),
            "image_id": int(raw["image_id"]),
            "orig_size": tuple(int(v) for v in raw["orig_size"]),
            "input_size": tuple(int(v) for v in raw["input_size"]),
            "scale": tuple(float(v) for v in raw["scale"]),
            "num_boxes": int(raw["num_boxes"]),
            "boxes": torch.from_numpy(np.array(raw["boxes"], dtype=np.float32)),
            "scores": torch.from_numpy(np.array(raw["scores"], dtype=np.float32)),
            "labels": torch.from_numpy(np.array(raw["labels"], dtype=np.int64)),
            "queries": decode_float(np.asarray(raw["queries"]), dtype),
            "features": feats,
        }
        if self.load_targets:
            m = self.mask_size
            packed = np.asarray(raw["mask_targets"], dtype=np.uint8)
            rec["match_ann_id"] = torch.from_numpy(np.array(raw["match_ann_id"], dtype=np.int64))
            rec["match_iou"] = torch.from_numpy(np.array(raw["match_iou"], dtype=np.float32))
            rec["mask_targets"] = torch.from_numpy(np.unpackbits(packed, axis=-1, count=m).astype(bool))
        return rec
