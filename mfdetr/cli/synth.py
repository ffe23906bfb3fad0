"""``mfdetr synth``: write the embedded synthetic shapes dataset (COCO format)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import Opt, pick, with_options

# the keyword arguments of mfdetr.data.synth.make_synth
OPTIONS = (
    Opt("train", int, 2000, "Number of training images.", min=0),
    Opt("val", int, 300, "Number of validation images.", min=0),
    Opt("size", int, 192, "Image side in pixels (square images).", min=32),
    Opt("seed", int, 0, "Dataset seed: the same seed gives byte-identical files."),
    Opt(
        "workers",
        int | None,
        None,
        "Processes to render with (default: the CPU count, at most 8). The output does not depend on it.",
        min=1,
    ),
)


@app.command("synth")
@with_options(OPTIONS)
def synth(
    out: Path = typer.Argument(
        ..., help="Output folder; OUT/train and OUT/val are written (created if needed)."
    ),
    **kw: Any,
) -> None:
    """Write the synthetic shapes dataset: six shape categories whose masks differ inside similar boxes,
    with occlusion, three size ranges and a cluttered background. Each split holds annotations.json
    (COCO instances, masks as RLE) and images/ (PNG)."""
    from mfdetr.data.synth import make_synth

    t0 = time.perf_counter()
    result = make_synth(out, **pick(kw, OPTIONS), progress=True)
    dt = time.perf_counter() - t0
    for split, info in result.items():
        typer.echo(
            f"{split}: {info['num_images']} images, {info['num_annotations']} instances -> "
            f"{info['annotations']} (images in {info['images']})"
        )
    n = sum(info["num_images"] for info in result.values())
    typer.echo(f"wrote {n} images in {dt:.1f} s")
