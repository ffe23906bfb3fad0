"""The DataLoader side of ``extract``: batches of decoded images and GT masks (``BatchSource``), bad images
reported as reasons (``FATAL`` marks an error to raise in the main process)."""

from __future__ import annotations

from typing import Any

import torch

from mfdetr.errors import MfdetrError

FATAL = "\0fatal:"


def identity(x: Any) -> Any:
    return x


class BatchSource(torch.utils.data.Dataset):
    """Index j -> the j-th batch: list of (position, image_id, payload | None, bad reason | None).

    payload = {"image": [3,H,W] uint8, "gt": {...}} computed in the DataLoader worker.
    """

    def __init__(self, dataset: Any, batches: list[list[int]], skip_bad: bool) -> None:
        self.dataset = dataset
        self.batches = batches
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.batches)

    def _load(self, pos: int) -> tuple[int, int, dict[str, Any] | None, str | None]:
        image_id = int(self.dataset.image_ids[pos])
        try:
            s = self.dataset[pos]
        except MfdetrError as e:
            # raised in the main process (a DataLoader worker would wrap it in a traceback dump)
            return pos, image_id, None, (str(e) if self.skip_bad else FATAL + str(e))
        if s is None:  # CocoDataset(skip_bad=True) recorded why
            bad = getattr(self.dataset, "bad", None) or []
            reason = next((str(r) for iid, r in reversed(bad) if int(iid) == image_id), "bad image")
            return pos, image_id, None, reason
        img = s.image
        gt = {
            "boxes": torch.as_tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(s.labels, dtype=torch.int64).reshape(-1),
            "iscrowd": torch.as_tensor(s.iscrowd, dtype=torch.bool).reshape(-1),
            "ann_ids": torch.as_tensor(s.ann_ids, dtype=torch.int64).reshape(-1),
            "masks": torch.as_tensor(s.masks, dtype=torch.bool),
            "orig_size": (int(img.shape[1]), int(img.shape[2])),
        }
        return pos, image_id, {"image": img, "gt": gt}, None

    def __getitem__(self, j: int) -> list[tuple[int, int, dict[str, Any] | None, str | None]]:
        return [self._load(p) for p in self.batches[j]]
