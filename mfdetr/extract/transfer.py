"""The detector outputs' trip to the host (``HostTransfer``): on an accelerator, the float maps and
queries are converted to the cache's storage dtype on the device (float16/bfloat16 halve the bytes
copied, and the writers are left only matching, compression and writes), then copied into pinned host
buffers with non-blocking copies, one synchronisation per batch.

Levels that a storage lever rewrites (projection, box mask, int8: ``mfdetr/cache/storage.py``) travel
as float32: the writers need the full values.
"""

from __future__ import annotations

from typing import Any

import torch

from mfdetr.cache.floats import merge_stats, stats_sampled, to_storage
from mfdetr.cache.storage import StorageCodec
from mfdetr.detectors.base import DetectorOutput


class HostTransfer:
    """Callable: a batch of detector outputs (on the detector's device) -> the same outputs on the CPU.

    convert: storage conversion before the copy (default: when ``device`` is not the CPU; on a CPU
        detector the writer processes convert, in parallel with the next forward).
    """

    def __init__(self, meta: dict[str, Any], device: torch.device | str, convert: bool | None = None) -> None:
        opts = meta["options"]
        self.dtype = opts["dtype"]
        self.keepbits = opts["keepbits"]
        device = torch.device(device)
        self.convert = device.type != "cpu" if convert is None else bool(convert)
        self.levels_too = not StorageCodec(meta).active
        self.pinned = device.type == "cuda"
        self.device = device
        self.f16_stats: dict[str, dict[str, int]] = {}
        self._n = 0

    def _stats(self, name: str) -> dict[str, int] | None:
        if self.dtype != "float16" or not stats_sampled(self._n):
            return None
        return self.f16_stats.setdefault(name, {})

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return x.to("cpu")
        h = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return h.copy_(x, non_blocking=True)

    def _one(self, o: DetectorOutput) -> DetectorOutput:
        queries, features = o.queries, dict(o.features)
        if self.convert:
            queries = to_storage(queries, self.dtype, self.keepbits, self._stats("queries"))
            if self.levels_too:
                for name, f in features.items():
                    features[name] = to_storage(f, self.dtype, self.keepbits, self._stats(f"level {name}"))
            self._n += 1
        return DetectorOutput(
            boxes=self._host(o.boxes),
            scores=self._host(o.scores),
            labels=self._host(o.labels),
            queries=self._host(queries),
            features={k: self._host(v) for k, v in features.items()},
            scale=o.scale,
            input_size=o.input_size,
            orig_size=o.orig_size,
            extras={k: self._host(v) for k, v in o.extras.items()},
        )

    def __call__(self, outputs: list[DetectorOutput]) -> list[DetectorOutput]:
        out = [self._one(o) for o in outputs]
        if self.pinned:  # the non-blocking copies must land before the writers read the buffers
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def merge_stats_into(self, stats: dict[str, dict[str, int]]) -> None:
        merge_stats(stats, self.f16_stats)
