"""Stage two: train the mask network from a cache (``train_from_cache``).

config (TrainConfig), data (opening caches, loader, preload decision), selection (the boxes of a step),
schedule (LR), validation, runtime (device, autocast, threads), loop (the epoch loop).
"""

from mfdetr.train.config import TrainConfig
from mfdetr.train.loop import train_from_cache

__all__ = ["TrainConfig", "train_from_cache"]
