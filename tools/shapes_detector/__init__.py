"""The pieces of ``tools/train_shapes_detector.py`` (the script that trains the shipped ``shapes`` detector):
``model`` (architecture), ``data`` (synth splits in memory, flips), ``evaluation`` (box AP) and ``training``
(optimizer, schedule, EMA, checkpoints, the step loop, the final save)."""

from __future__ import annotations

import time


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)
