"""``mfdetr run PIPELINE.toml``: the whole method from one experiment file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import FORCE, Opt, with_options

OPTIONS = (
    Opt(
        "set_",
        list[str],
        [],
        "Override any pipeline key, TOML syntax: --set train.epochs=2 --set out=runs/x "
        "--set cache_root=/data/caches. Repeatable.",
        flag="--set",
    ),
    Opt("dry_run", bool, False, "Check paths and print the estimated cache size; extract nothing."),
    FORCE,
)


@app.command("run")
@with_options(OPTIONS)
def run_cmd(
    pipeline: Path = typer.Argument(..., help="Experiment file, e.g. pipelines/shapes.toml."), **kw: Any
) -> None:
    """Run a pipeline: make synthetic data if asked, extract train/val caches (re-used by
    fingerprint under cache_root), train the mask network from the cache, evaluate COCO mask and
    box AP, print one summary table. Finished stages are skipped on a re-run."""
    from mfdetr.pipeline.config import load_pipeline
    from mfdetr.pipeline.stages import run_pipeline

    cfg = load_pipeline(pipeline, kw["set_"])
    if kw["dry_run"]:
        from mfdetr.pipeline.budget import dry_run as do_dry_run
        from mfdetr.pipeline.budget import format_budget

        typer.echo(format_budget(do_dry_run(cfg)))
        return
    run_pipeline(cfg, force=kw["force"])
