"""Stage one: run the frozen detector once per image and write the Zarr cache.

``extract(...)`` is the Python API behind ``mfdetr extract``. The pipeline:

    DataLoader workers (decode image + GT masks)  ->  main thread: detector.detect(batch)
        -> bounded queues -> writer processes (``writers``; or one thread with writers=0): matching,
                             mask targets, dtype conversion, block buffers, Zarr writes (compression
                             happens here), ``done`` last per block; block b goes to writer b % writers

so the detector forward overlaps decoding, compression and writing, and the writers' Python work
does not contend for the detector process's GIL. Work is split in *blocks*
(``options.block`` images = one Zarr shard): a process owns blocks ``r, r + n, r + 2n, ...``
(``--shard r/n``, or torchrun's RANK/WORLD_SIZE, or both), skips blocks already done (resume) and
writes each block once. Batches never cross a block boundary, so batch composition, hence every
byte, is the same whether a run was interrupted, resumed or split.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfdetr import __version__
from mfdetr.cache.fingerprint import cache_fingerprint, store_name
from mfdetr.cache.schema import FEAT_GROUP, SCHEMA_VERSION, ExtractOptions, MatchOptions, auto_block, padded_sizes
from mfdetr.cache.writer import BlockWriter, create_or_open, encode_float, float16_warnings, is_url
from mfdetr.errors import MfdetrError
from mfdetr.model.matching import compute_targets

__all__ = ["ExtractOptions", "MatchOptions", "ExtractResult", "extract", "resolve_store_path", "parse_shard"]

DEFAULT_CACHE_ROOT = Path("cache")


@dataclass
class ExtractResult:
    """What ``extract`` did.

    path: the store (local path or URL); fingerprint: the cache fingerprint;
    num_images: images in the dataset; images_done: done images in the store after this run;
    images_bad: of those, images skipped as bad (this run or an earlier one);
    images_written: images this process extracted now (0 when reused);
    reused: True when this process found all its blocks already done and did nothing;
    bad: (image_id, reason) of images skipped by this process (skip_bad);
    warnings: storage warnings of this run (e.g. a level whose values underflow float16);
    timings: seconds: total, setup, detect (detector forward), load_wait (waiting for decoded
        images), write (writers busy, summed), write_cpu (their CPU seconds; writer processes only),
        put_wait (detector waiting for the writers), final_write_wait (writers finishing after the
        last forward), and images_per_s.
    """

    path: str
    fingerprint: str
    num_images: int
    images_done: int
    images_bad: int
    images_written: int
    reused: bool
    bad: list[tuple[int, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    warnings: list[str] = field(default_factory=list)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None passes through."""
    if text is None or text == "":
        return None
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise MfdetrError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise MfdetrError(f"--shard {text}: need 0 <= i < n")
    return i, n


def resolve_store_path(detector_spec: str, annotations: Path, fingerprint: str, out: str | None,
                       cache_root: Path | str | None) -> str:
    """The store location: ``out`` as given, else ``<cache_root>/<detector>-<dataset>-<fp12>.zarr``."""
    if out is not None and cache_root is not None:
        raise MfdetrError("give either --out or --cache-root, not both")
    if out is not None:
        return str(out)
    root = str(cache_root) if cache_root is not None else str(DEFAULT_CACHE_ROOT)
    name = store_name(detector_spec, annotations, fingerprint)
    if is_url(root):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


# ---------------------------------------------------------------------------------------------
# helpers


def _dist_info() -> tuple[int, int, bool, bool]:
    """(rank, world, uses torch.distributed, we initialised it) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, False, False
    import torch.distributed as dist

    mine = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise MfdetrError("WORLD_SIZE > 1 but no MASTER_ADDR: run under torchrun, or use --shard i/n")
        dist.init_process_group("gloo")
        mine = True
    return dist.get_rank(), dist.get_world_size(), True, mine


def _image_hw(dataset: Any, i: int) -> tuple[int, int]:
    info = dataset.image_info(i)
    if not isinstance(info, dict):
        info = vars(info)
    return int(info["height"]), int(info["width"])


_FATAL = "\0fatal:"


def _identity(x: Any) -> Any:
    return x


class _BatchSource(torch.utils.data.Dataset):
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
            return pos, image_id, None, (str(e) if self.skip_bad else _FATAL + str(e))
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


def _make_batches(writer: BlockWriter, blocks: list[int], batch_size: int) -> list[list[int]]:
    out = []
    for b in blocks:
        s, e = writer.block_range(b)
        for k in range(s, e, batch_size):
            out.append(list(range(k, min(e, k + batch_size))))
    return out


class _Sink:
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

    def _stats(self, name: str) -> dict[str, int] | None:
        # float16 range statistics on a sample of images (the first 8, then 1 in 16): underflow is
        # a property of the detector's level, and counting costs a few passes over each map
        if self.dtype != "float16" or not (self._n_encoded < 8 or self._n_encoded % 16 == 0):
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
            raise MfdetrError(f"image id {image_id}: detector queries have shape {tuple(o.queries.shape)}, "
                              f"expected [K, {d}]")
        boxes = np.zeros((k, 4), np.float32)
        boxes[:n] = o.boxes[:n].float().numpy()
        scores = np.zeros(k, np.float32)
        scores[:n] = o.scores[:n].float().numpy()
        labels = np.full(k, -1, np.int64)
        labels[:n] = o.labels[:n].long().numpy()
        queries = torch.zeros((k, d), dtype=torch.float32)
        queries[:n] = o.queries[:n].float()
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
                raise MfdetrError(f"image id {image_id}: detector returned no level {name!r} "
                                  f"(it returned {sorted(o.features)})")
            f = o.features[name]
            sizes.append([int(f.shape[1]), int(f.shape[2])])
            vals[f"{FEAT_GROUP}/{name}"] = encode_float(f, self.dtype, self.keepbits, self._stats(f"level {name}"))
        vals["feat_size"] = np.asarray(sizes, np.int32)
        if tuple(gt["orig_size"]) != tuple(int(v) for v in o.orig_size):
            raise MfdetrError(f"image id {image_id}: detector orig_size {o.orig_size} != image {gt['orig_size']}")
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


class _ThreadWriter:
    """``writers=0``: one background thread of this process consumes a bounded queue."""

    def __init__(self, writer: BlockWriter, meta: dict[str, Any], maxsize: int) -> None:
        self.sink = _Sink(writer, meta)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.stop_now = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mfdetr-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None or self.stop_now.is_set():
                    return
                self.sink.handle(item)
        except BaseException as e:  # reported to the main thread
            self.error = e

    def put(self, item: Any) -> float:
        """Queue an item; returns seconds spent waiting. Raises the writer's error if it died."""
        t0 = time.perf_counter()
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return time.perf_counter() - t0
            except queue.Full:
                continue

    def finish(self) -> tuple[int, float, dict[str, dict[str, int]], float | None]:
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.sink.written, self.sink.busy_s, self.sink.f16_stats, None

    def abort(self) -> None:
        self.stop_now.set()
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (no orphan writer after a kill -9)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _writer_process_main(path: str, meta: dict[str, Any], q_in: Any, q_out: Any, parent: int) -> None:
    """A writer process: reopen the store, then handle items until None (see _Sink)."""
    import traceback

    _die_with_parent()
    torch.set_num_threads(1)
    try:
        sink = _Sink(BlockWriter(create_or_open(path, meta, create=False), meta), meta)
        while True:
            try:
                item = q_in.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the extract process is gone
                    return
                continue
            if item is None:
                break
            sink.handle(item)
        q_out.put(("done", sink.written, sink.busy_s, sink.f16_stats, sink.busy_cpu_s))
    except BaseException as e:
        q_out.put(("error", type(e).__name__, str(e), traceback.format_exc(), isinstance(e, MfdetrError)))


class _ProcessWriter:
    """``writers=N``: N writer processes; block b's images all go to process b % N (one writer per
    block, as the store requires), so N blocks are converted, compressed and written in parallel,
    out of the detector process's GIL."""

    def __init__(self, path: str, meta: dict[str, Any], n: int, maxsize: int) -> None:
        import torch.multiprocessing as mp

        self.block = int(meta["options"]["block"])
        self.q_out = mp.Queue()
        self.qs = [mp.Queue(maxsize=maxsize) for _ in range(n)]
        self.procs = [mp.Process(target=_writer_process_main, args=(path, meta, q, self.q_out, os.getpid()),
                                 name=f"mfdetr-cache-writer-{i}", daemon=True) for i, q in enumerate(self.qs)]
        for p in self.procs:
            p.start()
        self.results: list[tuple] = []

    def _check(self) -> None:
        while True:
            try:
                msg = self.q_out.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "error":
                self.abort()
                _, kind, text, tb, user = msg
                if user:
                    raise MfdetrError(text)
                raise RuntimeError(f"cache writer process failed: {kind}: {text}\n{tb}")
            self.results.append(msg)
        for p in self.procs:
            if not p.is_alive() and p.exitcode not in (0, None):
                self.abort()
                raise MfdetrError(f"cache writer process {p.name} died (exit code {p.exitcode}; out of memory?)")

    def put(self, item: Any) -> float:
        t0 = time.perf_counter()
        q = self.qs[(item[1] // self.block) % len(self.qs)]
        while True:
            self._check()
            try:
                q.put(item, timeout=0.2)
                return time.perf_counter() - t0
            except queue.Full:
                continue

    def finish(self) -> tuple[int, float, dict[str, dict[str, int]], float | None]:
        for q in self.qs:
            while True:
                self._check()
                try:
                    q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue
        while len(self.results) < len(self.procs):
            self._check()
            try:
                msg = self.q_out.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg[0] == "error":
                self.q_out.put(msg)
                continue
            self.results.append(msg)
        for p in self.procs:
            p.join(timeout=30)
        written = sum(r[1] for r in self.results)
        busy = sum(r[2] for r in self.results)
        stats: dict[str, dict[str, int]] = {}
        for r in self.results:
            for name, st in r[3].items():
                acc = stats.setdefault(name, {})
                for key, v in st.items():
                    acc[key] = acc.get(key, 0) + v
        return written, busy, stats, sum(r[4] for r in self.results)

    def abort(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# the API


def _build_detector(spec: str, dataset: Any, opts: ExtractOptions, device: str):
    from mfdetr.detectors.registry import build_detector

    return build_detector(spec, categories=dataset.categories, device=device, levels=opts.levels, topk=opts.topk)


def build_meta(detector: Any, dataset: Any, images: Path, annotations: Path, opts: ExtractOptions) -> dict[str, Any]:
    """The group metadata (``mfdetr`` attribute) for this detector x dataset x options."""
    levels = [{"name": lv.name, "stride": int(lv.stride), "channels": int(lv.channels)} for lv in detector.levels]
    if opts.levels is not None and [lv["name"] for lv in levels] != list(opts.levels):
        got = [lv["name"] for lv in levels]
        if sorted(got) != sorted(opts.levels):
            raise MfdetrError(f"asked for levels {opts.levels} but the detector gives {got}")
    n = len(dataset.image_ids)
    input_sizes = [tuple(detector.input_size(_image_hw(dataset, i))) for i in range(n)]
    padded = padded_sizes(input_sizes, levels)
    options = opts.to_attrs()
    if options["block"] is None:
        options["block"] = auto_block(levels, padded, opts.topk, int(detector.query_dim), opts.dtype)
    fp = cache_fingerprint(detector.fingerprint, dataset.fingerprint, options)
    return {
        "schema_version": SCHEMA_VERSION,
        "mfdetr_version": __version__,
        "fingerprint": fp,
        "detector": {"spec": detector.spec, "fingerprint": detector.fingerprint, "query_dim": int(detector.query_dim),
                     "levels": levels},
        "dataset": {
            "annotations": str(Path(annotations).resolve()),
            "images": str(Path(images).resolve()),
            "fingerprint": dataset.fingerprint,
            "num_images": n,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in dataset.categories],
        },
        "options": options,
        "padded": padded,
    }


def extract(
    detector_spec: Any,
    images: Path | str,
    annotations: Path | str,
    out: str | None = None,
    cache_root: Path | str | None = None,
    opts: ExtractOptions | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    workers: int = 2,
    writers: int = 1,
    shard: tuple[int, int] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Run ``detector_spec`` (a spec string, or a FrozenDetector object) over the COCO dataset and
    write (or complete, or reuse) its cache; see the module doc. Resumes by default.

    workers: DataLoader processes decoding images and masks (0 = in this process).
    writers: processes converting, matching, compressing and writing blocks (0 = one thread of
        this process; raise it when the detector is fast, e.g. on a GPU, and cores are free).
    """
    from mfdetr.data.coco import CocoDataset
    import torchvision.ops  # noqa: F401  (slow first import: keep it out of the writer thread)

    t_start = time.perf_counter()
    opts = (opts or ExtractOptions()).validate()
    if batch_size < 1:
        raise MfdetrError(f"batch size must be >= 1, got {batch_size}")
    images, annotations = Path(images), Path(annotations)
    dataset = CocoDataset(annotations, images, skip_bad=skip_bad, load_masks=True)
    if isinstance(detector_spec, str):
        detector = _build_detector(detector_spec, dataset, opts, device)
        spec = detector_spec
    else:
        detector = detector_spec.to(device)
        spec = detector.spec
    meta = build_meta(detector, dataset, images, annotations, opts)
    fp = meta["fingerprint"]
    path = resolve_store_path(spec, annotations, fp, out, cache_root)
    if not is_url(path) and cache_root is not None:
        Path(cache_root).mkdir(parents=True, exist_ok=True)

    # who owns which blocks
    rank, world, use_dist, own_pg = _dist_info()
    wid, wtotal = rank, world
    if shard is not None:
        si, sn = shard
        wid, wtotal = si * world + rank, sn * world

    # create (rank 0 first under torchrun; every --shard job may create: creation is race-safe)
    if use_dist:
        import torch.distributed as dist

        err = [None]
        if rank == 0:
            try:
                create_or_open(path, meta, create=True)
            except MfdetrError as e:
                err = [str(e)]
        dist.broadcast_object_list(err, src=0)
        if err[0] is not None:
            raise MfdetrError(err[0])
        group = create_or_open(path, meta, create=(rank == 0))
    else:
        group = create_or_open(path, meta, create=True)
    writer = BlockWriter(group, meta)
    owned = list(range(wid, writer.num_blocks, wtotal))
    pending = writer.pending_blocks(owned)
    t_setup = time.perf_counter() - t_start

    timings = {"setup": t_setup, "detect": 0.0, "load_wait": 0.0, "write": 0.0, "put_wait": 0.0}
    bad: list[tuple[int, str]] = []
    warns: list[str] = []
    written = 0
    if pending:
        batches = _make_batches(writer, pending, batch_size)
        n_todo = sum(len(b) for b in batches)
        source = _BatchSource(dataset, batches, skip_bad)
        loader = torch.utils.data.DataLoader(
            source, batch_size=None, shuffle=False, num_workers=max(0, int(workers)), collate_fn=_identity,
            prefetch_factor=2 if workers > 0 else None,
        )
        maxsize = max(2, 2 * int(meta["options"]["block"]))
        # memory:// stores live in this process only: a writer process would write into its own copy
        use_procs = writers > 0 and not str(path).startswith("memory://")
        bg: Any = (_ProcessWriter(path, meta, int(writers), maxsize) if use_procs
                   else _ThreadWriter(writer, meta, maxsize))
        from tqdm import tqdm

        bar = tqdm(total=n_todo, unit="img", desc=f"extract {Path(str(path)).name}", disable=not progress or rank != 0,
                   dynamic_ncols=True, smoothing=0.1)
        try:
            it = iter(loader)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                timings["load_wait"] += time.perf_counter() - t0
                for _, _, _, reason in batch:
                    if reason is not None and reason.startswith(_FATAL):
                        raise MfdetrError(reason[len(_FATAL):])
                good = [(p, iid, pl) for p, iid, pl, _ in batch if pl is not None]
                outs = []
                if good:
                    t0 = time.perf_counter()
                    outs = detector.detect([pl["image"].to(detector.device) for _, _, pl in good])
                    outs = [o.to("cpu") for o in outs]
                    timings["detect"] += time.perf_counter() - t0
                byp = {p: o for (p, _, _), o in zip(good, outs)}
                for p, iid, pl, reason in batch:
                    if pl is None:
                        bad.append((iid, reason or "bad image"))
                        timings["put_wait"] += bg.put(("bad", p, iid))
                    else:
                        timings["put_wait"] += bg.put(("img", p, iid, byp[p], pl["gt"]))
                bar.update(len(batch))
            t0 = time.perf_counter()
            written, timings["write"], f16_stats, write_cpu = bg.finish()
            if write_cpu is not None:
                timings["write_cpu"] = write_cpu
            timings["final_write_wait"] = time.perf_counter() - t0
        except BaseException:
            bg.abort()
            raise
        finally:
            bar.close()
        warns = float16_warnings(f16_stats)
    if use_dist:
        import torch.distributed as dist

        dist.barrier()
        if own_pg:
            dist.destroy_process_group()
    done_mask = writer.done_mask()
    done = int(done_mask.sum())
    n_bad = int((done_mask & np.asarray(group["bad"][:], bool)).sum())
    timings["total"] = time.perf_counter() - t_start
    timings["images_per_s"] = written / timings["total"] if written else 0.0
    return ExtractResult(
        path=path, fingerprint=fp, num_images=writer.n, images_done=done, images_bad=n_bad, images_written=written,
        reused=not pending, bad=bad, timings=timings, rank=rank, world=world, warnings=warns,
    )
