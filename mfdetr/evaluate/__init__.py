"""Evaluation and prediction: COCO mask / box / Boundary / occluded AP over a cache (``evaluate``), live
masks (``predict``).

config (EvalConfig, PredictConfig, the output-folder check), evaluation (the evaluate run, EvalResult),
prediction (the predict run, PredictResult), jobs (mask network -> per-image boxes), meta (checkpoint
metadata and compatibility), paste (box-local pasting), coco_results (RLE and per-image result jobs),
gt (ground truth: reading, degenerate annotations, occluded subset), coco_eval (COCOeval, the one owner;
the AP table), overlays (PNG overlays).
"""

from mfdetr.evaluate.config import EvalConfig, PredictConfig
from mfdetr.evaluate.evaluation import EvalResult, evaluate
from mfdetr.evaluate.prediction import PredictResult, predict

__all__ = ["EvalConfig", "EvalResult", "PredictConfig", "PredictResult", "evaluate", "predict"]
