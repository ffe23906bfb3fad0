"""``mfdetr evaluate``: COCO mask and box AP of a checkpoint on a (validation) cache."""

from __future__ import annotations

from pathlib import Path

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import MaskThreshold, echo_warnings


@app.command("evaluate")
def evaluate_cmd(
    cache: str = typer.Option(
        ..., "--cache", help="Validation cache store (path or fsspec URL) made by `mfdetr extract`."
    ),
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        help="Mask-network checkpoint (.pt) from `mfdetr train-from-cache`; "
        "it must come from the same detector (fingerprint and levels) as the cache.",
    ),
    annotations: Path | None = typer.Option(
        None,
        "--annotations",
        help="COCO annotation JSON with the ground truth (default: the file the cache was extracted from).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder for results_segm.json, results_bbox.json, summary.json and vis/ "
        "(default: RUN/eval for a checkpoint RUN/checkpoints/X.pt).",
    ),
    topk: int = typer.Option(
        100,
        "--topk",
        min=1,
        help="Masks (and boxes) kept per image, best final score first; also COCOeval's largest maxDets.",
    ),
    vis: int = typer.Option(
        0, "--vis", min=0, help="Write overlay PNGs (masks, boxes, labels, scores) for the first N images."
    ),
    vis_score_threshold: float = typer.Option(
        0.3, "--vis-score-threshold", help="Only results scoring at least this are drawn in the overlays."
    ),
    mask_score: bool = typer.Option(
        True,
        "--mask-score/--no-mask-score",
        help="Re-weight each mask's score by its predicted mask IoU "
        "(final score = detection score x predicted IoU).",
    ),
    per_category: bool = typer.Option(
        False, "--per-category", help="Also report (and print) the AP of every category."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Cache images per mask-network batch."),
    workers: int = typer.Option(
        2, "--workers", min=0, help="Worker processes that paste and RLE-encode masks (0 = in process)."
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="Torch device of the mask network (and of the chunked paste off the CPU): cpu, cuda, cuda:1, ..",
    ),
    mask_threshold: MaskThreshold = 0.5,
    evaluator: str = typer.Option(
        "faster",
        "--evaluator",
        help="COCO evaluator: faster (faster-coco-eval: mask, box, Boundary and occluded AP) "
        "or pycocotools (mask, box and occluded AP; same mask and box AP, no Boundary AP).",
    ),
    boundary: bool = typer.Option(
        True,
        "--boundary/--no-boundary",
        help="Compute Boundary AP (faster evaluator; on large images its boundary "
        "bands take about as long as the masks themselves).",
    ),
) -> None:
    """Evaluate a checkpoint on a cache: masks for the top boxes of each image pasted into the original
    image, COCO results JSON, COCOeval (mask, box, Boundary and occluded-instance AP table), summary.json
    and optional overlays."""
    from mfdetr.evaluate.config import EvalConfig
    from mfdetr.evaluate.evaluation import evaluate

    cfg = EvalConfig(
        topk=topk,
        vis=vis,
        vis_score_threshold=vis_score_threshold,
        mask_score=mask_score,
        per_category=per_category,
        batch_size=batch_size,
        workers=workers,
        device=device,
        mask_threshold=mask_threshold,
        evaluator=evaluator,
        boundary=boundary,
        progress=True,
    )
    res = evaluate(cache, checkpoint, cfg, annotations=annotations, out=out)
    echo_warnings(res.warnings)
    typer.echo(res.table())
    out_dir = Path(res.files["summary"]).parent
    typer.echo(
        f"{res.num_images} images, {res.num_detections} masks, {res.images_per_s:.1f} images/s (masks), "
        f"COCOeval ({res.metrics.evaluator}) {res.timing['cocoeval_s']:.1f} s -> {out_dir}"
    )
