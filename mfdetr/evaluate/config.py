"""How ``evaluate`` and ``predict`` run: one dataclass each (the CLI and the pipeline build them), and
how they write their JSON files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mfdetr.errors import MfdetrError

EVALUATORS = ("faster", "pycocotools")


def _check_range(name: str, value: float, lo: float, hi: float | None = None) -> None:
    if value != value or value < lo or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise MfdetrError(f"{name} must be {span} (got {value})")


@dataclass
class EvalConfig:
    """Options of ``mfdetr evaluate`` (and of a pipeline's ``[evaluate]`` table).

    topk: masks (and boxes) kept per image by final score; also COCOeval's largest maxDets.
    vis / vis_score_threshold: overlay PNGs of the first ``vis`` images, drawing results >= the threshold.
    mask_score: final score = detection score x predicted mask IoU (else the detection score).
    per_category: also the AP of every category.
    batch_size: cache images per mask-network batch. workers: paste/encode processes (0 = in process).
    device: where the mask network (and, off the CPU, the chunked paste) runs.
    mask_threshold: probability threshold of the pasted masks.
    evaluator: "faster" (faster-coco-eval: mask, box, Boundary and occluded AP) or "pycocotools"
        (mask, box and occluded AP; no Boundary AP).
    boundary: compute Boundary AP (faster only; its boundary bands cost about as much as the masks'
        paste and encode on large images).
    progress: a progress bar on stderr.
    """

    topk: int = 100
    vis: int = 0
    vis_score_threshold: float = 0.3
    mask_score: bool = True
    per_category: bool = False
    batch_size: int = 8
    workers: int = 2
    device: str = "cpu"
    mask_threshold: float = 0.5
    evaluator: str = "faster"
    boundary: bool = True
    progress: bool = True

    def validate(self) -> EvalConfig:
        _check_range("--topk", self.topk, 1)
        _check_range("--vis", self.vis, 0)
        _check_range("--batch-size", self.batch_size, 1)
        _check_range("--workers", self.workers, 0)
        _check_range("--mask-threshold", self.mask_threshold, 0.0, 1.0)
        _check_range("--vis-score-threshold", self.vis_score_threshold, 0.0, 1.0)
        if self.evaluator not in EVALUATORS:
            raise MfdetrError(f"--evaluator {self.evaluator!r}: choose one of {list(EVALUATORS)}")
        return self


@dataclass
class PredictConfig:
    """Options of ``mfdetr predict``.

    score_threshold: keep results whose final score is at least this. topk: at most this many per image.
    mask_score: final score = detection score x predicted mask IoU. batch_size: images per batch.
    mask_threshold: probability threshold of the pasted masks. vis: an overlay PNG per image.
    allow_detector_mismatch: run (with a warning) when the detector's fingerprint differs from the
    checkpoint's. skip_bad: skip unreadable images (reported in the result) instead of stopping.
    """

    score_threshold: float = 0.3
    topk: int = 100
    device: str = "cpu"
    mask_score: bool = True
    batch_size: int = 4
    mask_threshold: float = 0.5
    vis: bool = True
    allow_detector_mismatch: bool = False
    skip_bad: bool = False
    progress: bool = True

    def validate(self) -> PredictConfig:
        _check_range("--topk", self.topk, 1)
        _check_range("--batch-size", self.batch_size, 1)
        _check_range("--score-threshold", self.score_threshold, 0.0, 1.0)
        _check_range("--mask-threshold", self.mask_threshold, 0.0, 1.0)
        return self


def write_json(path: Path, obj: object, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON via a temporary file (no half-written file left behind on a full disk)."""
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MfdetrError(
            f"cannot write {path}: {e.strerror or e}; free disk space or choose another --out"
        ) from None
    return path
