"""The background writers of ``extract``: one thread of the extract process (``ThreadWriter``,
``writers=0``) or N writer processes (``ProcessWriter``), each feeding a ``Sink`` from a bounded queue."""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import torch

from mfdetr.cache.floats import merge_stats
from mfdetr.cache.writer import BlockWriter, create_or_open
from mfdetr.errors import MfdetrError
from mfdetr.extract.matching import preload
from mfdetr.extract.sink import Sink
from mfdetr.utils.fs import is_disk_full


def default_writers(workers: int) -> int:
    """Writer processes when none is asked for: half the cores the DataLoader workers leave (the
    detector process keeps the rest), at least 1, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, (cores - max(0, int(workers))) // 2))


class ThreadWriter:
    """``writers=0``: one background thread of this process consumes a bounded queue."""

    def __init__(self, writer: BlockWriter, meta: dict[str, Any], maxsize: int) -> None:
        self.sink = Sink(writer, meta)
        self.start_cpu: float | None = None  # no start-up of its own: it runs in the extract process
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
    """A writer process: reopen the store, then handle items until None (see Sink)."""
    import traceback

    _die_with_parent()
    torch.set_num_threads(1)
    try:
        c0 = time.process_time()  # start-up (store open, imports): once per process, not per image
        preload()
        sink = Sink(BlockWriter(create_or_open(path, meta, create=False), meta), meta)
        start_cpu = time.process_time() - c0
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
        q_out.put(("done", sink.written, sink.busy_s, sink.f16_stats, sink.busy_cpu_s, start_cpu))
    except BaseException as e:
        q_out.put(
            (
                "error",
                type(e).__name__,
                str(e),
                traceback.format_exc(),
                isinstance(e, MfdetrError),
                getattr(e, "errno", None),
            )
        )


class ProcessWriter:
    """``writers=N``: N writer processes; block b's images all go to process b % N (one writer per
    block, as the store requires), so N blocks are converted, compressed and written in parallel,
    out of the detector process's GIL."""

    def __init__(self, path: str, meta: dict[str, Any], n: int, maxsize: int) -> None:
        import torch.multiprocessing as mp

        self.block = int(meta["options"]["block"])
        self.q_out = mp.Queue()
        self.qs = [mp.Queue(maxsize=maxsize) for _ in range(n)]
        self.procs = [
            mp.Process(
                target=_writer_process_main,
                args=(path, meta, q, self.q_out, os.getpid()),
                name=f"mfdetr-cache-writer-{i}",
                daemon=True,
            )
            for i, q in enumerate(self.qs)
        ]
        for p in self.procs:
            p.start()
        self.results: list[tuple] = []
        self.start_cpu: float | None = None  # CPU seconds of the processes' start-up, summed (after finish)

    def _check(self) -> None:
        while True:
            try:
                msg = self.q_out.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "error":
                self.abort()
                _, kind, text, tb, user, err_no = msg
                if is_disk_full(OSError(err_no, text)):  # the extract process names the bytes needed
                    raise OSError(err_no, text)
                if user:
                    raise MfdetrError(text)
                raise RuntimeError(f"cache writer process failed: {kind}: {text}\n{tb}")
            self.results.append(msg)
        for p in self.procs:
            if not p.is_alive() and p.exitcode not in (0, None):
                self.abort()
                raise MfdetrError(
                    f"cache writer process {p.name} died (exit code {p.exitcode}; out of memory?)"
                )

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
            merge_stats(stats, r[3])
        self.start_cpu = sum(r[5] for r in self.results)
        return written, busy, stats, sum(r[4] for r in self.results)

    def abort(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
