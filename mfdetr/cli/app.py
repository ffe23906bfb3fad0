"""The typer application object shared by all command modules (one module per command group)."""

from __future__ import annotations

import typer

from mfdetr import __version__

app = typer.Typer(
    name="mfdetr",
    help=(
        "Turn a frozen DETR-family detector into an instance segmenter (Mask Frozen-DETR).\n\n"
        "Stage one, `extract`, runs the detector once and writes a Zarr cache; stage two, "
        "`train-from-cache`, trains the light mask network from the cache alone; `evaluate` "
        "reports COCO mask/box AP; `run` does all of it from one pipeline TOML."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

cache_app = typer.Typer(help="Inspect and check cache stores (`info`, `verify`).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mfdetr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the mfdetr version and exit."
    ),
    max_image_pixels: int | None = typer.Option(
        None,
        "--max-image-pixels",
        min=1,
        help="Image size limit in pixels for every command (default "
        "200000000 = 200 MP; also MFDETR_MAX_IMAGE_PIXELS): larger images are refused before decoding, a "
        "guard against decompression bombs. Give it first: mfdetr --max-image-pixels N extract ...",
    ),
) -> None:
    """mfdetr command line."""
    if max_image_pixels is not None:
        from mfdetr.data.image_io import set_max_image_pixels

        set_max_image_pixels(max_image_pixels)
