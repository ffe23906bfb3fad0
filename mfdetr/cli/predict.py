"""``mfdetr predict``: instance masks for new images, live (detector + mask network, no cache)."""

from __future__ import annotations

from pathlib import Path

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import MaskThreshold, echo_warnings


@app.command("predict")
def predict_cmd(
    images: list[Path] = typer.Argument(..., help="Image files, or folders of images, to segment."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Mask-network checkpoint (.pt) from `mfdetr train-from-cache`."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output folder: predictions.json (COCO-style results with file_name) and vis/*.png.",
    ),
    detector: str | None = typer.Option(
        None,
        "--detector",
        help="Detector spec (hf:PATH, shapes, py:module:function); default: the one the checkpoint was "
        "trained on. It is built with the checkpoint's levels and top-k and must have the same fingerprint.",
    ),
    score_threshold: float = typer.Option(
        0.3, "--score-threshold", min=0.0, max=1.0, help="Keep masks whose final score is at least this."
    ),
    topk: int = typer.Option(
        100, "--topk", min=1, help="At most this many masks per image, best final score first."
    ),
    mask_score: bool = typer.Option(
        True,
        "--mask-score/--no-mask-score",
        help="Final score = detection score x predicted mask IoU (else the detection score).",
    ),
    batch_size: int = typer.Option(
        4, "--batch-size", min=1, help="Images per detector / mask-network batch."
    ),
    mask_threshold: MaskThreshold = 0.5,
    vis: bool = typer.Option(
        True, "--vis/--no-vis", help="Write an overlay PNG per image (masks, boxes, labels, scores)."
    ),
    allow_detector_mismatch: bool = typer.Option(
        False,
        "--allow-detector-mismatch",
        help="Run even when the detector's fingerprint differs from the checkpoint's (warns).",
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Torch device of the detector and the mask network: cpu, cuda, cuda:1, ..."
    ),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        help="Skip unreadable (missing, truncated, corrupt, too large) images and report them, "
        "instead of stopping at the first.",
    ),
) -> None:
    """Segment new images with a frozen detector and a trained mask network (the live path of the
    modules `evaluate` uses), writing COCO-style predictions and overlay PNGs."""
    from mfdetr.evaluate.config import PredictConfig
    from mfdetr.evaluate.prediction import predict

    cfg = PredictConfig(
        score_threshold=score_threshold,
        topk=topk,
        device=device,
        mask_score=mask_score,
        batch_size=batch_size,
        mask_threshold=mask_threshold,
        vis=vis,
        allow_detector_mismatch=allow_detector_mismatch,
        skip_bad=skip_bad,
        progress=True,
    )
    res = predict(checkpoint, images, out, cfg, detector=detector)
    echo_warnings(res.warnings)
    skipped = f" ({len(res.skipped)} unreadable image(s) skipped)" if res.skipped else ""
    typer.echo(
        f"{res.num_images} images, {len(res.results)} masks -> {res.files['predictions']}{skipped}", err=True
    )
