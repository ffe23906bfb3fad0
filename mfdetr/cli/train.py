"""``mfdetr train-from-cache``: train the mask network from a cache (no detector, no images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import Opt, pick, with_options

INPUTS = (
    Opt(
        "cache",
        str,
        ...,
        "Train cache store (path or fsspec URL) made by `mfdetr extract` with annotations (it holds the "
        "matched mask targets).",
    ),
    Opt(
        "out",
        Path,
        ...,
        "Run directory: checkpoints/ (epoch_XXX.pt, last.pt, best.pt), metrics.jsonl, train_config.json.",
    ),
    Opt(
        "config",
        Path | None,
        None,
        "TOML with TrainConfig fields (epochs, lr, \\[model], \\[loss], ...) at the top level or under "
        "\\[train] (a pipeline file works).",
    ),
)
# TrainConfig fields; an option not given (None, or a flag left off) keeps the value of --config / --set
OVERRIDES = (
    Opt("epochs", int | None, None, "Passes over the train cache, >= 1 (default 4)."),
    Opt("batch_size", int | None, None, "Images per step, per process (default 8)."),
    Opt("lr", float | None, None, "AdamW peak learning rate (default 2e-3)."),
    Opt("amp", str | None, None, "Mixed precision: bf16, fp16 (CUDA only) or off (default off)."),
    Opt(
        "workers",
        int | None,
        None,
        "DataLoader worker processes reading the cache (default -1 = auto: 2 on CPU, cores-1 up to 8 on "
        "CUDA; with a preload they only read it once).",
    ),
    Opt(
        "preload",
        str | None,
        None,
        "Hold the decoded train/val caches in RAM: auto (when they fit preload_max_gb, default 4 GiB, "
        "and half the free memory), on, off (stream from the store every epoch). Default auto.",
    ),
    Opt("device", str | None, None, "auto (CUDA if present), cpu, cuda, cuda:N (default auto)."),
    Opt(
        "allow_partial",
        bool,
        False,
        "Train on a cache an extract has not finished (its done images only; warned loudly). "
        "Default: refused.",
    ),
    Opt(
        "skip_damaged",
        bool,
        False,
        "Skip cache records that fail their integrity check (counted in the log) instead of stopping "
        "with an error.",
    ),
    Opt("seed", int | None, None, "Seed of the model init, sampler and per-step sampling (default 0)."),
    Opt(
        "threads",
        int | None,
        None,
        "torch CPU threads (default 0 = auto: the cores per process left after the DataLoader workers "
        "-- all of them after a preload -- at least 1).",
    ),
)
# the keyword arguments of mfdetr.train.loop.train_from_cache, and --set
RUN = (
    Opt(
        "resume",
        bool,
        False,
        "Continue exactly from OUT/checkpoints/last.pt, or the newest readable epoch_XXX.pt when "
        "last.pt is missing or torn (same loss sequence as an uninterrupted run). Refused when the "
        "cache's image count changed since.",
    ),
    Opt(
        "val_cache",
        str | None,
        None,
        "Validation cache: mean mask IoU of matched boxes (up to val_max_boxes_per_image per image, one "
        "per object first) each epoch; best.pt by it.",
    ),
    Opt(
        "sets",
        list[str],
        [],
        "Override any TrainConfig field, dotted: --set model.dim=64 --set loss.num_points=512 "
        "--set schedule=step (repeatable).",
        flag="--set",
    ),
    Opt("progress", bool, True, "Show the tqdm bar (loss, images/s).", flag="--progress/--no-progress"),
)


@app.command("train-from-cache")
@with_options(INPUTS, OVERRIDES, RUN)
def train_cmd(**kw: Any) -> None:
    """Train the mask network from a cache alone (no detector, no image decoding, no annotation file).

    Under `torchrun --nproc-per-node N -m mfdetr train-from-cache ...` it runs DistributedDataParallel
    (gloo on CPU, NCCL on GPU); rank 0 validates, logs and writes checkpoints.
    """
    from mfdetr.train.config import build_train_config
    from mfdetr.train.loop import train_from_cache
    from mfdetr.utils.distributed import torchrun_env

    explicit = {k: None if v is False else v for k, v in pick(kw, OVERRIDES).items()}
    cfg = build_train_config(kw["config"], kw["sets"], explicit)
    res = train_from_cache(
        kw["cache"], kw["out"], cfg, val_cache=kw["val_cache"], resume=kw["resume"], progress=kw["progress"]
    )
    if torchrun_env().rank == 0:
        line = f"done: {res.steps} steps, train loss {res.train_loss:.4f}"
        if res.val_miou == res.val_miou:  # not NaN
            line += f", val mean mask IoU {res.val_miou:.4f} (best {res.best_val_miou:.4f})"
        typer.echo(line + f", {res.seconds:.0f}s; checkpoint {res.checkpoint}")
