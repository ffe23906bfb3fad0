"""``mfdetr synth``: write the embedded synthetic shapes dataset (COCO format)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from mfdetr.cli.app import app


@app.command("synth")
def synth(
    out: Path = typer.Argument(
        ..., help="Output folder; OUT/train and OUT/val are written (created if needed)."
    ),
    train: int = typer.Option(2000, "--train", min=0, help="Number of training images."),
    val: int = typer.Option(300, "--val", min=0, help="Number of validation images."),
    size: int = typer.Option(192, "--size", min=32, help="Image side in pixels (square images)."),
    seed: int = typer.Option(0, "--seed", help="Dataset seed: the same seed gives byte-identical files."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Processes to render with (default: the CPU count, at most 8). "
        "The output does not depend on it.",
    ),
) -> None:
    """Write the synthetic shapes dataset: six shape categories whose masks differ inside similar boxes,
    with occlusion, three size ranges and a cluttered background. Each split holds annotations.json
    (COCO instances, masks as RLE) and images/ (PNG)."""
    from mfdetr.data.synth import make_synth

    t0 = time.perf_counter()
    result = make_synth(out, train=train, val=val, size=size, seed=seed, workers=workers, progress=True)
    dt = time.perf_counter() - t0
    for split, info in result.items():
        typer.echo(
            f"{split}: {info['num_images']} images, {info['num_annotations']} instances -> "
            f"{info['annotations']} (images in {info['images']})"
        )
    n = sum(info["num_images"] for info in result.values())
    typer.echo(f"wrote {n} images in {dt:.1f} s")
