"""``mfdetr`` console script: a thin typer layer over the Python API.

Each command lives in its own module and registers itself on ``app``; ``main`` turns
``MfdetrError`` into a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import sys

from mfdetr.cli.app import app
from mfdetr.errors import MfdetrError
from mfdetr.utils.fs import is_disk_full

_COMMAND_MODULES = ["synth", "extract", "cache_cmds", "train", "evaluate", "predict", "run"]
for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"mfdetr.cli.{_name}")
    except ModuleNotFoundError as e:  # a command module not written yet
        if e.name != f"mfdetr.cli.{_name}":
            raise


def main() -> None:
    """Entry point of the ``mfdetr`` script."""
    try:
        app()
    except MfdetrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not is_disk_full(e):
            raise
        # a last resort: the writers name the bytes needed; any other write on a full disk still ends here
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"error: disk full{where} ({e.strerror or e}); free space or choose another --out, then run "
            "the same command again",
            file=sys.stderr,
        )
        sys.exit(2)


__all__ = ["app", "main"]
