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
from mfdetr.cache.schema import ATTR_KEY, FEAT_GROUP, check_meta, quiet_zarr
from mfdetr.cache.writer import decode_float, store_arg
from mfdetr.detectors.base import LevelSpec
from mfdetr.errors import MfdetrError

_BASE = ("image_id", "orig_size", "input_size", "scale", "num_boxes", "feat_size", "boxes", "scores", "labels",
         "queries")
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
        raise MfdetrError(f"cannot open cache {where}: {type(e).__name__}: {e}") from e
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

    def __init__(self, path_or_url: Any, load_targets: bool = True) -> None:
        self.path = str(path_or_url)
        self.load_targets = bool(load_targets)
        g = open_cache(self.path)
        self._meta = cache_meta(g)
        done = np.asarray(g["done"][:], dtype=bool)
        bad = np.asarray(g["bad"][:], dtype=bool)
        self.positions = np.flatnonzero(done & ~bad)
        self.num_images = int(self._meta["dataset"]["num_images"])
        self._group: zarr.Group | None = g
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
        return [LevelSpec(lv["name"], int(lv["stride"]), int(lv["channels"])) for lv in levels]

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
            ids = np.asarray(self._get_group()["image_id"][:])
            self._image_ids = [int(ids[p]) for p in self.positions]
        return self._image_ids

    def collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``collate_records`` bound to this cache's levels (use as a DataLoader ``collate_fn``)."""
        return collate_records(records, self.levels)

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
            self._group = open_cache(self.path)
            self._arrays = None
            self._pid = os.getpid()
        return self._group

    @quiet_zarr()
    def _get_arrays(self) -> dict[str, Any]:
        self._get_group()
        if self._arrays is None:
            g = self._get_group()
            names = list(_BASE) + [f"{FEAT_GROUP}/{lv.name}" for lv in self.levels]
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
        return self.record_at(int(self.positions[j]))

    def raw_at(self, position: int) -> dict[str, np.ndarray]:
        """The stored arrays of image ``position`` as on disk (features padded, dtype as stored)."""
        from zarr.core.sync import sync

        try:
            return sync(_read_all(self._get_arrays(), int(position)))
        except ValueError as e:
            if "checksum" in str(e) and self.path.startswith(("http://", "https://")):
                raise MfdetrError(
                    f"{self.path}: a shard failed its checksum over HTTP (image position {position}): the store "
                    "on the server is corrupt or was changed while being read; run `mfdetr cache verify` on it"
                ) from e
            raise

    def record_at(self, position: int) -> dict[str, Any]:
        """The record of image ``position`` (it should be done; see ``positions``)."""
        raw = self.raw_at(position)
        dtype = self.dtype
        sizes = np.asarray(raw["feat_size"])
        feats = {}
        for li, lv in enumerate(self.levels):
            h, w = int(sizes[li, 0]), int(sizes[li, 1])
            feats[lv.name] = decode_float(np.asarray(raw[f"{FEAT_GROUP}/{lv.name}"])[:, :h, :w], dtype)
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
