"""The per-image step of ``extract``'s writers (``Sink``): checks, dtype conversion, matching + mask
targets, block buffers, and whole-block Zarr writes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mfdetr.cache.floats import encode_float, stats_sampled
from mfdetr.cache.schema import FEAT_GROUP, QPARAM_GROUP
from mfdetr.cache.storage import StorageCodec
from mfdetr.cache.writer import BlockWriter
from mfdetr.errors import MfdetrError
from mfdetr.extract.matching import compute_targets


class Sink:
    """Per image: checks, dtype conversion, matching + mask targets, into block buffers; a complete
    block is written whole (``done`` last). Runs in a writer thread or a writer process."""

    def __init__(self, writer: BlockWriter, meta: dict[str, Any]) -> None:
        self.writer = writer
        self.busy_s = 0.0
        self.busy_cpu_s = 0.0  # CPU of the whole process while busy (meaningful in a writer process)
        self.written = 0
        self.buffers: dict[int, Any] = {}
        opts = meta["options"]
        self.k = int(opts["topk"])
        self.dtype = opts["dtype"]
        self.keepbits = opts["keepbits"]
        self.mask_size = int(opts["mask_size"])
        self.rule = opts["match"]["rule"]
        self.thr = float(opts["match"]["iou_threshold"])
        self.levels = [lv["name"] for lv in meta["detector"]["levels"]]
        self.d = int(meta["detector"]["query_dim"])
        self.f16_stats: dict[str, dict[str, int]] = {}
        self._n_encoded = 0
        self.codec = StorageCodec(meta)

    def _stats(self, name: str) -> dict[str, int] | None:
        # float16 range statistics on a sample of images (maps converted on the detector's device were
        # counted there: they arrive in the storage dtype and are not counted again)
        if self.dtype != "float16" or not stats_sampled(self._n_encoded):
            return None
        return self.f16_stats.setdefault(name, {})

    def _buffer(self, pos: int):
        b = pos // self.writer.block
        if b not in self.buffers:
            self.buffers[b] = self.writer.new_buffer(b)
        return self.buffers[b]

    def _encode(self, pos: int, image_id: int, o: Any, gt: dict[str, Any]) -> dict[str, np.ndarray]:
        k, d = self.k, self.d
        n = min(int(o.boxes.shape[0]), k)
        if o.queries.ndim != 2 or (n > 0 and o.queries.shape[1] != d):
            raise MfdetrError(
                f"image id {image_id}: detector queries have shape {tuple(o.queries.shape)}, "
                f"expected [K, {d}]"
            )
        boxes = np.zeros((k, 4), np.float32)
        boxes[:n] = o.boxes[:n].float().numpy()
        scores = np.zeros(k, np.float32)
        scores[:n] = o.scores[:n].float().numpy()
        labels = np.full(k, -1, np.int64)
        labels[:n] = o.labels[:n].long().numpy()
        queries = o.queries.new_zeros((k, d))  # float32, or the storage dtype when converted on the device
        queries[:n] = o.queries[:n]
        vals: dict[str, np.ndarray] = {
            "image_id": np.int64(image_id),
            "orig_size": np.asarray(o.orig_size, np.int32),
            "input_size": np.asarray(o.input_size, np.int32),
            "scale": np.asarray(o.scale, np.float32),
            "num_boxes": np.int32(n),
            "boxes": boxes,
            "scores": scores,
            "labels": labels,
            "queries": encode_float(queries, self.dtype, self.keepbits, self._stats("queries")),
        }
        sizes = []
        for name in self.levels:
            if name not in o.features:
                raise MfdetrError(
                    f"image id {image_id}: detector returned no level {name!r} "
                    f"(it returned {sorted(o.features)})"
                )
            f = o.features[name]
            sizes.append([int(f.shape[1]), int(f.shape[2])])
            if self.codec.active:  # projection / box masking / quantization (mfdetr/cache/storage.py)
                f, reg = self.codec.pre(name, f, boxes, n, o.scale)
                if self.codec.quant:
                    st = self._stats(f"level {name}")
                    if st is not None:  # decoded values are rounded to float16 too: warn on its range
                        encode_float(f, self.dtype, None, st)
                    q, params = self.codec.quantize(name, f, reg)
                    vals[f"{FEAT_GROUP}/{name}"] = q
                    if params is not None:
                        vals[f"{QPARAM_GROUP}/{name}"] = params
                    continue
            vals[f"{FEAT_GROUP}/{name}"] = encode_float(
                f, self.dtype, self.keepbits, self._stats(f"level {name}")
            )
        vals["feat_size"] = np.asarray(sizes, np.int32)
        if tuple(gt["orig_size"]) != tuple(int(v) for v in o.orig_size):
            raise MfdetrError(
                f"image id {image_id}: detector orig_size {o.orig_size} != image {gt['orig_size']}"
            )
        vals.update(compute_targets(boxes, labels, scores, n, gt, self.rule, self.thr, self.mask_size))
        self._n_encoded += 1
        return vals

    def handle(self, item: tuple) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        kind = item[0]
        if kind == "img":
            _, pos, image_id, o, gt = item
            buf = self._buffer(pos)
            buf.put(pos, self._encode(pos, image_id, o, gt))
        else:
            _, pos, image_id = item
            buf = self._buffer(pos)
            buf.put_bad(pos, image_id)
        if buf.complete:
            self.writer.write(buf)
            self.written += buf.stop - buf.start
            del self.buffers[buf.block]
        self.busy_s += time.perf_counter() - t0
        self.busy_cpu_s += time.process_time() - c0
