"""``metrics.jsonl`` of a run: one JSON record per line (``start``, ``step``, ``epoch``, ``resume``);
a resume first cuts the file back to the restored step, so no step appears twice."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError


class MetricsLog:
    """Appends records to ``path`` (when ``enabled``: rank 0); write errors are MfdetrErrors."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise MfdetrError(
                f"cannot write {self.path}: {e.strerror or e}; free space or choose another --out"
            ) from e

    def truncate_to(self, step: int) -> int:
        """Drop every record from the first one past ``step`` (and any torn last line); -> lines dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        keep: list[str] = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by the kill, and whatever follows
            if rec.get("type") in ("step", "epoch") and int(rec.get("step", 0)) > step:
                break
            keep.append(line)
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            try:
                tmp.write_text("".join(x + "\n" for x in keep))
                os.replace(tmp, self.path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise MfdetrError(f"cannot rewrite {self.path}: {e.strerror or e}") from e
        return len(lines) - len(keep)
