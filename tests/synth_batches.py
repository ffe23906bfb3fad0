"""A tiny in-memory stand-in for a cache, for the mask-network tests (no detector, no Zarr).

``SyntheticCache(n)`` is a torch Dataset of records in the ``mfdetr/cache/batch.py`` format: discs and
squares on a small image, per-level features that are real functions of the objects (occupancy and
a type channel, rendered at each level's cell centres), jittered predicted boxes with a few unmatched
ones, queries encoding the object type and box, and mask targets = the object's analytic mask
sampled at the cell centres of the PREDICTED box (exactly what extraction stores). Deterministic per
index; picklable (DataLoader workers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mfdetr.cache.batch import collate_records
from mfdetr.detectors.base import LevelSpec

LEVELS = [LevelSpec("s4", 4, 8), LevelSpec("s8", 8, 12), LevelSpec("s16", 16, 16)]


def _inside(kind: int, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if kind == 0:
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)


class SyntheticCache(torch.utils.data.Dataset):
    """See the module doc. ``levels``, ``query_dim``, ``attrs``, ``fingerprint``, ``collate`` as CacheDataset."""

    def __init__(
        self,
        n: int = 16,
        size: int = 64,
        k: int = 6,
        mask_size: int = 16,
        query_dim: int = 16,
        levels: list[LevelSpec] | None = None,
        seed: int = 0,
        scale: float = 1.0,
    ):
        self.n, self.size, self.k, self.mask_size, self.query_dim = n, size, k, mask_size, query_dim
        self.levels = list(levels or LEVELS)
        self.seed = seed
        self.scale = scale
        self.fingerprint = f"synthetic-{n}-{size}-{k}-{mask_size}-{query_dim}-{seed}-{scale}"
        self.attrs = {
            "fingerprint": self.fingerprint,
            "detector": {
                "spec": "synthetic",
                "fingerprint": "synthetic-detector",
                "query_dim": query_dim,
                "levels": [
                    {"name": lv.name, "stride": lv.stride, "channels": lv.channels} for lv in self.levels
                ],
            },
            "dataset": {
                "fingerprint": "synthetic-data",
                "num_images": n,
                "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}],
            },
            "options": {"topk": k, "mask_size": mask_size},
        }

    def __len__(self) -> int:
        return self.n

    def collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_records(records, self.levels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng(self.seed * 100003 + i)
        s0 = self.size
        n_obj = int(rng.integers(1, 4))
        objs = []
        for _ in range(n_obj):
            kind = int(rng.integers(0, 2))
            r = float(rng.uniform(6, 14))
            cx, cy = float(rng.uniform(r, s0 - r)), float(rng.uniform(r, s0 - r))
            objs.append((kind, cx, cy, r))
        sc = self.scale
        h_in = w_in = int(round(s0 * sc))
        feats = {}
        for lv in self.levels:
            h, w = -(-h_in // lv.stride), -(-w_in // lv.stride)
            # supersample 2x2 per cell for a soft occupancy
            sub = (np.arange(2 * h) + 0.5) * lv.stride / 2 / sc
            yy, xx = np.meshgrid(sub, (np.arange(2 * w) + 0.5) * lv.stride / 2 / sc, indexing="ij")
            occ = np.zeros((2 * h, 2 * w))
            typ = np.zeros((2 * h, 2 * w))
            for kind, cx, cy, r in objs:
                m = _inside(kind, cx, cy, r, xx, yy)
                occ = np.maximum(occ, m)
                typ = np.where(m, 1.0 if kind else -1.0, typ)
            occ = occ.reshape(h, 2, w, 2).mean((1, 3))
            typ = typ.reshape(h, 2, w, 2).mean((1, 3))
            mix = np.random.default_rng(lv.stride).standard_normal((lv.channels, 2))
            f = mix[:, :1, None] * occ[None] + mix[:, 1:, None] * typ[None]
            f = f + 0.05 * rng.standard_normal(f.shape)
            feats[lv.name] = torch.from_numpy(f.astype(np.float32))
        boxes = np.zeros((self.k, 4), np.float32)
        scores = np.zeros(self.k, np.float32)
        labels = np.full(self.k, -1, np.int64)
        queries = np.zeros((self.k, self.query_dim), np.float32)
        match = np.full(self.k, -1, np.int64)
        miou = np.zeros(self.k, np.float32)
        targets = np.zeros((self.k, self.mask_size, self.mask_size), bool)
        n_box = min(self.k, n_obj + 2)
        for j in range(n_box):
            if j < n_obj:
                kind, cx, cy, r = objs[j]
                jit = rng.uniform(-0.15, 0.15, 4) * r
                b = np.array([cx - r, cy - r, cx + r, cy + r]) + jit
                match[j] = 1000 * i + j
                miou[j] = 0.8
            else:  # an unmatched box somewhere
                kind, cx, cy, r = 0, float(rng.uniform(10, s0 - 10)), float(rng.uniform(10, s0 - 10)), 8.0
                b = np.array([cx - r, cy - r, cx + r, cy + r])
            b = np.clip(b, 0, s0)
            boxes[j] = b
            scores[j] = 0.9 - 0.1 * j
            labels[j] = 1 + kind
            queries[j, 0] = 1.0 if kind else -1.0
            queries[j, 1:5] = b / s0
            queries[j, 5:] = 0.1 * rng.standard_normal(self.query_dim - 5)
            if j < n_obj:
                t = (np.arange(self.mask_size) + 0.5) / self.mask_size
                ys = b[1] + t * (b[3] - b[1])
                xs = b[0] + t * (b[2] - b[0])
                yy, xx = np.meshgrid(ys, xs, indexing="ij")
                targets[j] = _inside(kind, cx, cy, r, xx, yy)
        order = np.argsort(-scores[:n_box], kind="stable")
        sl = slice(0, n_box)
        for arr in (boxes, scores, labels, queries, match, miou, targets):
            arr[sl] = arr[sl][order]
        return {
            "index": i,
            "image_id": i + 1,
            "orig_size": (s0, s0),
            "input_size": (h_in, w_in),
            "scale": (sc, sc),
            "num_boxes": n_box,
            "boxes": torch.from_numpy(boxes),
            "scores": torch.from_numpy(scores),
            "labels": torch.from_numpy(labels),
            "queries": torch.from_numpy(queries),
            "features": feats,
            "match_ann_id": torch.from_numpy(match),
            "match_iou": torch.from_numpy(miou),
            "mask_targets": torch.from_numpy(targets),
        }
