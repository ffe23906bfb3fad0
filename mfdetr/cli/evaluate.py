"""``mfdetr evaluate``: COCO mask and box AP of a checkpoint on a (validation) cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import MASK_THRESHOLD, Opt, echo_warnings, pick, with_options

INPUTS = (
    Opt("cache", str, ..., "Validation cache store (path or fsspec URL) made by `mfdetr extract`."),
    Opt(
        "checkpoint",
        Path,
        ...,
        "Mask-network checkpoint (.pt) from `mfdetr train-from-cache`; it must come from the same "
        "detector (fingerprint and levels) as the cache.",
    ),
    Opt(
        "annotations",
        Path | None,
        None,
        "COCO annotation JSON with the ground truth (default: the file the cache was extracted from).",
    ),
    Opt(
        "out",
        Path | None,
        None,
        "Output folder for results_segm.json, results_bbox.json, summary.json and vis/ (default: "
        "RUN/eval for a checkpoint RUN/checkpoints/X.pt).",
    ),
)
# the fields of EvalConfig (but progress)
CONFIG = (
    Opt(
        "topk",
        int,
        100,
        "Masks (and boxes) kept per image, best final score first; also COCOeval's largest maxDets.",
        min=1,
    ),
    Opt("vis", int, 0, "Write overlay PNGs (masks, boxes, labels, scores) for the first N images.", min=0),
    Opt("vis_score_threshold", float, 0.3, "Only results scoring at least this are drawn in the overlays."),
    Opt(
        "mask_score",
        bool,
        True,
        "Re-weight each mask's score by its predicted mask IoU (final score = detection score x "
        "predicted IoU).",
        flag="--mask-score/--no-mask-score",
    ),
    Opt("per_category", bool, False, "Also report (and print) the AP of every category."),
    Opt("batch_size", int, 8, "Cache images per mask-network batch.", min=1),
    Opt("workers", int, 2, "Worker processes that paste and RLE-encode masks (0 = in process).", min=0),
    Opt(
        "device",
        str,
        "cpu",
        "Torch device of the mask network (and of the chunked paste off the CPU): cpu, cuda, cuda:1, ..",
    ),
    MASK_THRESHOLD,
    Opt(
        "evaluator",
        str,
        "faster",
        "COCO evaluator: faster (faster-coco-eval: mask, box, Boundary and occluded AP) or pycocotools "
        "(mask, box and occluded AP; same mask and box AP, no Boundary AP).",
    ),
    Opt(
        "boundary",
        bool,
        True,
        "Compute Boundary AP (faster evaluator; on large images its boundary bands take about as long "
        "as the masks themselves).",
        flag="--boundary/--no-boundary",
    ),
)


@app.command("evaluate")
@with_options(INPUTS, CONFIG)
def evaluate_cmd(**kw: Any) -> None:
    """Evaluate a checkpoint on a cache: masks for the top boxes of each image pasted into the original
    image, COCO results JSON, COCOeval (mask, box, Boundary and occluded-instance AP table), summary.json
    and optional overlays."""
    from mfdetr.evaluate.config import EvalConfig
    from mfdetr.evaluate.evaluation import evaluate

    cfg = EvalConfig(**pick(kw, CONFIG), progress=True)
    res = evaluate(kw["cache"], kw["checkpoint"], cfg, annotations=kw["annotations"], out=kw["out"])
    echo_warnings(res.warnings)
    typer.echo(res.table())
    out_dir = Path(res.files["summary"]).parent
    typer.echo(
        f"{res.num_images} images, {res.num_detections} masks, {res.images_per_s:.1f} images/s (masks), "
        f"COCOeval ({res.metrics.evaluator}) {res.timing['cocoeval_s']:.1f} s -> {out_dir}"
    )
