"""``mfdetr predict``: instance masks for new images, live (detector + mask network, no cache)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mfdetr.cli.app import app


@app.command("predict")
def predict_cmd(
    images: List[Path] = typer.Argument(..., help="Image files, or folders of images, to segment."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Mask-network checkpoint (.pt) from `mfdetr train-from-cache`."),
    out: Path = typer.Option(..., "--out", help="Output folder: predictions.json (COCO-style results with file_name) and vis/*.png."),
    detector: Optional[str] = typer.Option(
        None, "--detector", help="Detector spec (hf:PATH, shapes, py:module:function); default: the one the checkpoint was "
        "trained on. It is built with the checkpoint's levels and top-k and must have the same fingerprint."
    ),
    score_threshold: float = typer.Option(0.3, "--score-threshold", min=0.0, max=1.0, help="Keep masks whose final score is at least this."),
    topk: int = typer.Option(100, "--topk", min=1, help="At most this many masks per image, best final score first."),
    mask_score: bool = typer.Option(
        True, "--mask-score/--no-mask-score", help="Final score = detection score x predicted mask IoU (else the detection score)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per detector / mask-network batch."),
    mask_threshold: float = typer.Option(0.5, "--mask-threshold", min=0.0, max=1.0, help="Probability threshold of the pasted masks."),
    vis: bool = typer.Option(True, "--vis/--no-vis", help="Write an overlay PNG per image (masks, boxes, labels, scores)."),
    allow_detector_mismatch: bool = typer.Option(
        False, "--allow-detector-mismatch", help="Run even when the detector's fingerprint differs from the checkpoint's (warns)."
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device of the detector and the mask network: cpu, cuda, cuda:1, ..."),
) -> None:
    """Segment new images with a frozen detector and a trained mask network (the live path of the
    modules `evaluate` uses), writing COCO-style predictions and overlay PNGs."""
    from mfdetr.evaluate.prediction import predict

    predict(
        detector,
        checkpoint,
        images,
        out,
        score_threshold=score_threshold,
        topk=topk,
        device=device,
        mask_score=mask_score,
        batch_size=batch_size,
        mask_threshold=mask_threshold,
        vis=vis,
        allow_detector_mismatch=allow_detector_mismatch,
        progress=True,
    )
