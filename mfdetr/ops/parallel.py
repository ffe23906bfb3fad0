"""CPU execution helpers for the fused RoIAlign: coarse-grained threads, memory that avoids page faults.

Why not just ATen's intra-op threads: the op is a few hundred small tensor ops plus a few large
gathers. Every ATen parallel op is an OpenMP fork/join; that is cheap on idle cores but costs a
scheduler time slice per op when the cores are oversubscribed (a shared 2-core machine), which made
the whole op 2-10x slower than single-threaded. So the CPU path runs its ops single-threaded and
splits the large work into independent chunks handed to a small pool of worker threads (ATen kernels
release the GIL): one join per phase instead of one fork/join per op.

Fresh large buffers are the other cost: the first touch of freshly mmapped memory page-faults, which
on a VM costs about as much as writing the buffer twice. Hence: chunk results small enough for malloc
to recycle (the backward writes the features' gradients chunk by chunk), and a workspace reused across
calls for the channels-last copy of the levels.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

# chunks of work write at most this many bytes of fresh results (small blocks: malloc recycles them)
CHUNK_BYTES = 2 << 20

# ----------------------------------------------------------------------------------------------------
# threads


_tls = threading.local()


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run ATen ops on the calling thread only (no OpenMP fork/join per op); ``n_workers`` still sees
    the thread count set outside."""
    n = torch.get_num_threads()
    outer = getattr(_tls, "outer", None)
    if outer is None:
        _tls.outer = n
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
        if outer is None:
            _tls.outer = None


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """ATen ops on ``n`` threads (for one large op inside ``serial``)."""
    m = torch.get_num_threads()
    if n != m:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != m:
            torch.set_num_threads(m)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _worker_init() -> None:
    # OpenMP's thread count is per thread: the workers run every op single-threaded
    torch.set_num_threads(1)


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            main_threads = torch.get_num_threads()
            _pool = ThreadPoolExecutor(
                max_workers=n, thread_name_prefix="mfdetr-roi-align", initializer=_worker_init
            )
            _pool_size = n
            # start the workers now, then restore the process-wide default that their
            # torch.set_num_threads(1) also wrote (threads created later start from it)
            list(_pool.map(lambda _: None, range(n)))
            torch.set_num_threads(main_threads)
        return _pool


# Deterministic by default: the split is a function of the configured thread count only. The load-
# adaptive split (fewer threads when the 1-minute load average says the other cores are busy, like
# OpenMP's dynamic mode) can be faster on a crowded machine, but then results depend on the machine's
# load; it is an explicit opt-in (env MFDETR_ADAPTIVE_THREADS=1), outside the deterministic guarantee.
DYNAMIC_THREADS = os.environ.get("MFDETR_ADAPTIVE_THREADS", "0").strip() == "1"


def n_workers(device: torch.device) -> int:
    """How many threads the CPU path splits its work over: the configured torch.get_num_threads() (seen
    outside ``serial``); with ``DYNAMIC_THREADS`` (opt-in) fewer when the load average is high."""
    if device.type != "cpu":
        return 1
    n = max(1, getattr(_tls, "outer", None) or torch.get_num_threads())
    if n > 1 and DYNAMIC_THREADS:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - not on this platform
            return n
        idle = (os.cpu_count() or n) - load  # cores nobody uses (our calling thread counts as load)
        n = max(1, min(n, int(idle + 1.5)))
    return n


def run_tasks(tasks: Sequence[Callable[[], object]], workers: int) -> list:
    """Run independent tasks (each runs single-threaded ATen ops); results in order."""
    if workers <= 1 or len(tasks) <= 1:
        with serial():
            return [t() for t in tasks]
    pool = _get_pool(workers)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def call(t: Callable[[], object]) -> object:  # autograd modes are per thread: the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return t()

    with serial():  # the calling thread also works: it takes the first task
        futures = [pool.submit(call, t) for t in tasks[1:]]
        try:
            first = tasks[0]()
        finally:
            results = [f.result() for f in futures]  # wait for all before leaving (or raising)
        return [first, *results]


# ----------------------------------------------------------------------------------------------------
# memory

# The channels-last copy of the levels goes into a per-process workspace kept between calls (CPU only,
# one per dtype, at most WORKSPACE_MAX_BYTES; 0 disables). It never escapes a call (nothing keeps it
# for backward), so reusing it is safe. ``release_workspace()`` frees it.
WORKSPACE_MAX_BYTES = 1 << 30
_workspace: dict[torch.dtype, Tensor] = {}
_workspace_lock = threading.Lock()


def take_workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    if device.type != "cpu" or numel * torch.finfo(dtype).bits // 8 > WORKSPACE_MAX_BYTES:
        return None
    with _workspace_lock:
        ws = _workspace.pop(dtype, None)  # taken: a concurrent call allocates its own
    if ws is None or ws.numel() < numel:
        ws = None
        with torch.inference_mode(False):  # a normal tensor, reusable in and out of inference mode
            ws = torch.empty(numel, dtype=dtype)
    return ws


def return_workspace(ws: Tensor | None) -> None:
    if ws is None or ws.numel() * ws.element_size() > WORKSPACE_MAX_BYTES:
        return
    with _workspace_lock:
        old = _workspace.get(ws.dtype)
        if old is None or old.numel() < ws.numel():
            _workspace[ws.dtype] = ws


def release_workspace() -> None:
    """Free the CPU workspace kept by ``multilevel_roi_align`` between calls."""
    with _workspace_lock:
        _workspace.clear()
