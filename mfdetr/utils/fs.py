"""Output locations: check up front that a directory can be written, and name a full disk clearly."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from mfdetr.errors import MfdetrError

_REASONS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a path component is a file, not a directory",
}


def _reason(e: OSError) -> str:
    return _REASONS.get(e.errno or 0, e.strerror or str(e))


def _is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def ensure_writable_dir(
    path: str | os.PathLike[str], what: str = "--out", create: bool = True
) -> Path | None:
    """Check that files can be written in directory ``path`` (``what`` names it in errors, e.g. ``--out``).

    Raises ``MfdetrError`` when a component of the path is a regular file, or the directory (or its nearest
    existing parent) is on a read-only file system, not writable, or full, by writing and removing a probe
    file of one byte. ``create=True`` creates the directory (with parents); otherwise the nearest existing
    parent is probed and nothing is created. URLs (``s3://``, ``memory://``) are not checked (None)."""
    if _is_url(path):
        return None
    p = Path(path).expanduser()
    probe_dir = p
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise MfdetrError(f"{what} {p}: {probe_dir} is a file, not a directory; choose another location")
    try:
        if create:
            p.mkdir(parents=True, exist_ok=True)
            probe_dir = p
        fd, probe = tempfile.mkstemp(prefix=".mfdetr-write-check-", dir=probe_dir)
        try:
            os.write(fd, b"\0")  # one byte: a full disk fails here, an empty file would still fit
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise MfdetrError(
            f"{what} {p}: cannot write in {probe_dir} ({_reason(e)}); "
            + ("free space there or choose another location" if is_disk_full(e) else "choose a writable one")
        ) from e
    return p


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(e: BaseException) -> bool:
    """True for an OSError saying the disk (or quota) is full."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(
    path: str | os.PathLike[str], needed_bytes: int | None, what: str = "writing"
) -> MfdetrError:
    """The one-line error for a full disk while ``what`` into ``path``: the bytes still needed and free."""
    free = free_bytes(path) if not _is_url(path) else None
    need = "more space is needed" if needed_bytes is None else f"about {_size(needed_bytes)} more is needed"
    have = f", {_size(free)} free" if free is not None else ""
    return MfdetrError(
        f"disk full while {what} {path}: {need}{have}. Free space there (or choose another location) and "
        "run the same command again: it resumes from what was written."
    )
