"""``mfdetr run PIPELINE.toml``: the whole method from one experiment file."""

from __future__ import annotations

from pathlib import Path

import typer

from mfdetr.cli.app import app


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(..., help="Experiment file, e.g. pipelines/shapes.toml."),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override any pipeline key, TOML syntax: --set train.epochs=2 --set out=runs/x "
        "--set cache_root=/data/caches. Repeatable.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check paths and print the estimated cache size; extract nothing."
    ),
    force: bool = typer.Option(
        False, "--force", help="Extract even when a cache's estimated size exceeds its disk's free space."
    ),
) -> None:
    """Run a pipeline: make synthetic data if asked, extract train/val caches (re-used by
    fingerprint under cache_root), train the mask network from the cache, evaluate COCO mask and
    box AP, print one summary table. Finished stages are skipped on a re-run."""
    from mfdetr.pipeline.config import load_pipeline
    from mfdetr.pipeline.stages import run_pipeline

    cfg = load_pipeline(pipeline, set_)
    if dry_run:
        from mfdetr.pipeline.budget import dry_run as do_dry_run
        from mfdetr.pipeline.budget import format_budget

        typer.echo(format_budget(do_dry_run(cfg)))
        return
    run_pipeline(cfg, force=force)
