"""``mfdetr predict``: instance masks for new images, live (detector + mask network, no cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import MASK_THRESHOLD, Opt, echo_warnings, pick, with_options

INPUTS = (
    Opt("checkpoint", Path, ..., "Mask-network checkpoint (.pt) from `mfdetr train-from-cache`."),
    Opt(
        "out", Path, ..., "Output folder: predictions.json (COCO-style results with file_name) and vis/*.png."
    ),
    Opt(
        "detector",
        str | None,
        None,
        "Detector spec (hf:PATH, shapes, py:module:function); default: the one the checkpoint was "
        "trained on. It is built with the checkpoint's levels and top-k and must have the same fingerprint.",
    ),
)
# the fields of PredictConfig (but progress)
CONFIG = (
    Opt("score_threshold", float, 0.3, "Keep masks whose final score is at least this.", min=0.0, max=1.0),
    Opt("topk", int, 100, "At most this many masks per image, best final score first.", min=1),
    Opt(
        "mask_score",
        bool,
        True,
        "Final score = detection score x predicted mask IoU (else the detection score).",
        flag="--mask-score/--no-mask-score",
    ),
    Opt("batch_size", int, 4, "Images per detector / mask-network batch.", min=1),
    MASK_THRESHOLD,
    Opt(
        "vis",
        bool,
        True,
        "Write an overlay PNG per image (masks, boxes, labels, scores).",
        flag="--vis/--no-vis",
    ),
    Opt(
        "allow_detector_mismatch",
        bool,
        False,
        "Run even when the detector's fingerprint differs from the checkpoint's (warns).",
    ),
    Opt("device", str, "cpu", "Torch device of the detector and the mask network: cpu, cuda, cuda:1, ..."),
    Opt(
        "skip_bad",
        bool,
        False,
        "Skip unreadable (missing, truncated, corrupt, too large) images and report them, instead of "
        "stopping at the first.",
    ),
)


@app.command("predict")
@with_options(INPUTS, CONFIG)
def predict_cmd(
    images: list[Path] = typer.Argument(..., help="Image files, or folders of images, to segment."),
    **kw: Any,
) -> None:
    """Segment new images with a frozen detector and a trained mask network (the live path of the
    modules `evaluate` uses), writing COCO-style predictions and overlay PNGs."""
    from mfdetr.evaluate.config import PredictConfig
    from mfdetr.evaluate.prediction import predict

    cfg = PredictConfig(**pick(kw, CONFIG), progress=True)
    res = predict(kw["checkpoint"], images, kw["out"], cfg, detector=kw["detector"])
    echo_warnings(res.warnings)
    skipped = f" ({len(res.skipped)} unreadable image(s) skipped)" if res.skipped else ""
    typer.echo(
        f"{res.num_images} images, {len(res.results)} masks -> {res.files['predictions']}{skipped}", err=True
    )
