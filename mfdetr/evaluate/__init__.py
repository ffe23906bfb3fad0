"""Evaluation and prediction: COCO mask / box AP over a cache (``evaluate``), live masks (``predict``).

evaluation (the evaluate run), prediction (the predict run), jobs (mask network -> per-image boxes),
meta (checkpoint metadata and compatibility), paste (box-local pasting), coco_results (RLE, COCOeval),
overlays (PNG overlays).
"""

from mfdetr.evaluate.evaluation import evaluate
from mfdetr.evaluate.prediction import predict

__all__ = ["evaluate", "predict"]
