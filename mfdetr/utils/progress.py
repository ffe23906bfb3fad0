"""The one progress-bar set-up: tqdm on stderr, sized to the terminal, silent when stderr is not a TTY."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "img",
    leave: bool = False,
    enabled: bool = True,
    **kwargs: Any,
) -> Any:
    """A tqdm bar on stderr (``dynamic_ncols``); a disabled one (``update``/``close`` are no-ops, iterating
    yields ``iterable`` unchanged) when ``enabled`` is false or stderr is not a terminal, so logs and
    captured output hold no bar lines. Extra keyword arguments (``smoothing``, ...) go to tqdm."""
    from tqdm import tqdm

    # disable=None is tqdm's "off when the stream is not a TTY"
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if enabled else True,
        **kwargs,
    )
