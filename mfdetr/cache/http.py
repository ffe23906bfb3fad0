"""Reading a cache over plain HTTP, including from servers that ignore ``Range`` requests.

Zarr's sharded arrays read byte ranges of their shard files (the shard index at the end, then one
inner chunk). Object stores, nginx and most CDNs honour ``Range``; ``python -m http.server`` does
not: it answers ``200`` with the whole file, which fsspec would hand to Zarr as if it were the range
(a checksum failure at best). ``RangeFallbackHTTPFileSystem`` checks the status of every ranged
read: ``206`` is used as is; ``200`` means the server sent the whole file, which is then sliced
locally and kept in a per-process LRU of whole files (``MFDETR_HTTP_WHOLE_FILE_MB``, default 512
MiB), so each shard crosses the network once per process instead of once per record.

``http_store(url)`` is the read-only Zarr store for an ``http(s)://`` cache URL.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from typing import Any

from fsspec.implementations.http import HTTPFileSystem

log = logging.getLogger(__name__)

DEFAULT_WHOLE_FILE_MB = 512


def _budget_bytes() -> int:
    try:
        return int(float(os.environ.get("MFDETR_HTTP_WHOLE_FILE_MB", DEFAULT_WHOLE_FILE_MB)) * 2**20)
    except ValueError:
        return DEFAULT_WHOLE_FILE_MB * 2**20


class WholeFileLRU:
    """Whole file bodies by URL, least recently used dropped first beyond ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.items: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0

    def get(self, url: str) -> bytes | None:
        body = self.items.get(url)
        if body is not None:
            self.items.move_to_end(url)
        return body

    def put(self, url: str, body: bytes) -> None:
        if url in self.items or len(body) > self.budget:
            return
        self.items[url] = body
        self.nbytes += len(body)
        while self.nbytes > self.budget and self.items:
            _, old = self.items.popitem(last=False)
            self.nbytes -= len(old)


class RangeFallbackHTTPFileSystem(HTTPFileSystem):
    """fsspec's HTTP filesystem whose ranged reads are correct whether or not the server honours
    ``Range`` (see the module docstring). ``start``/``end`` follow fsspec (and Python slicing):
    negative values count from the end, ``end`` is exclusive."""

    protocol = ("http", "https")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.whole = WholeFileLRU(_budget_bytes())
        self._locks: dict[str, asyncio.Lock] = {}
        self.ranges_ignored = False

    async def _cat_file(
        self, url: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        if start is None and end is None:
            return await super()._cat_file(url, **kwargs)
        if start == end:
            return b""
        body = self.whole.get(url)
        if body is not None:
            return body[start:end]
        if not self.ranges_ignored:
            kw = self.kwargs.copy()
            kw.update(kwargs)
            headers = dict(kw.pop("headers", {}) or {})
            headers["Range"] = await self._process_limits(url, start, end)
            session = await self.set_session()
            async with session.get(self.encode_url(url), headers=headers, **kw) as r:
                out = await r.read()
                self._raise_not_found_for_status(r, url)
                if r.status == 206:
                    return out
            # 200: the server ignored Range and sent the whole file
            if not self.ranges_ignored:
                log.warning(
                    "%s ignores HTTP Range requests: reading whole shard files instead "
                    "(cached in memory, MFDETR_HTTP_WHOLE_FILE_MB)",
                    url.split("/")[2] if "//" in url else url,
                )
            self.ranges_ignored = True
            self.whole.put(url, out)
            return out[start:end]
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:  # one download per file even when many chunks of it are read at once
            body = self.whole.get(url)
            if body is None:
                body = await super()._cat_file(url, **kwargs)
                self.whole.put(url, body)
        self._locks.pop(url, None)
        return body[start:end]


def http_store(url: str) -> Any:
    """A read-only Zarr ``FsspecStore`` over ``url`` (``http://`` or ``https://``) with the Range fallback."""
    from zarr.storage import FsspecStore

    fs = RangeFallbackHTTPFileSystem(asynchronous=True)
    return FsspecStore(fs=fs, path=url.rstrip("/"), read_only=True)
