"""``mfdetr train-from-cache``: train the mask network from a cache (no detector, no images)."""

from __future__ import annotations

from pathlib import Path

import typer

from mfdetr.cli.app import app


@app.command("train-from-cache")
def train_cmd(
    cache: str = typer.Option(
        ...,
        "--cache",
        help="Train cache store (path or fsspec URL) made by `mfdetr extract` "
        "with annotations (it holds the matched mask targets).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Run directory: checkpoints/ (epoch_XXX.pt, last.pt, best.pt), "
        "metrics.jsonl, train_config.json.",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="TOML with TrainConfig fields (epochs, lr, \\[model], \\[loss], ...) at the top "
        "level or under \\[train] (a pipeline file works).",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Passes over the train cache, >= 1 (default 4)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Images per step, per process (default 8)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="AdamW peak learning rate (default 2e-3)."),
    amp: str | None = typer.Option(
        None, "--amp", help="Mixed precision: bf16, fp16 (CUDA only) or off (default off)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        help="DataLoader worker processes reading the cache "
        "(default -1 = auto: 2 on CPU, cores-1 up to 8 on CUDA; with a preload "
        "they only read it once).",
    ),
    preload: str | None = typer.Option(
        None,
        "--preload",
        help="Hold the decoded train/val caches in RAM: auto (when "
        "they fit preload_max_gb, default 4 GiB, and half the free memory), on, off "
        "(stream from the store every epoch). Default auto.",
    ),
    device: str | None = typer.Option(
        None, "--device", help="auto (CUDA if present), cpu, cuda, cuda:N (default auto)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue exactly from OUT/checkpoints/last.pt, or the newest "
        "readable epoch_XXX.pt when last.pt is missing or torn (same loss sequence as an "
        "uninterrupted run). Refused when the cache's image count changed since.",
    ),
    allow_partial: bool = typer.Option(
        False,
        "--allow-partial",
        help="Train on a cache an extract has not finished "
        "(its done images only; warned loudly). Default: refused.",
    ),
    skip_damaged: bool = typer.Option(
        False,
        "--skip-damaged",
        help="Skip cache records that fail their integrity "
        "check (counted in the log) instead of stopping with an error.",
    ),
    val_cache: str | None = typer.Option(
        None,
        "--val-cache",
        help="Validation cache: mean mask IoU of matched boxes "
        "(up to val_max_boxes_per_image per image, one per object first) each "
        "epoch; best.pt by it.",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the model init, sampler and per-step sampling (default 0)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="torch CPU threads (default 0 = auto: the cores "
        "per process left after the DataLoader workers -- all of them after a "
        "preload -- at least 1).",
    ),
    sets: list[str] = typer.Option(
        [],
        "--set",
        help="Override any TrainConfig field, dotted: --set model.dim=64 "
        "--set loss.num_points=512 --set schedule=step (repeatable).",
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Show the tqdm bar (loss, images/s)."
    ),
) -> None:
    """Train the mask network from a cache alone (no detector, no image decoding, no annotation file).

    Under `torchrun --nproc-per-node N -m mfdetr train-from-cache ...` it runs DistributedDataParallel
    (gloo on CPU, NCCL on GPU); rank 0 validates, logs and writes checkpoints.
    """
    from mfdetr.train.config import build_train_config
    from mfdetr.train.loop import train_from_cache
    from mfdetr.utils.distributed import torchrun_env

    explicit = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "amp": amp,
        "workers": workers,
        "device": device,
        "seed": seed,
        "threads": threads,
        "preload": preload,
        "allow_partial": allow_partial or None,
        "skip_damaged": skip_damaged or None,
    }
    cfg = build_train_config(config, sets, explicit)
    res = train_from_cache(cache, out, cfg, val_cache=val_cache, resume=resume, progress=progress)
    if torchrun_env().rank == 0:
        line = f"done: {res.steps} steps, train loss {res.train_loss:.4f}"
        if res.val_miou == res.val_miou:  # not NaN
            line += f", val mean mask IoU {res.val_miou:.4f} (best {res.best_val_miou:.4f})"
        typer.echo(line + f", {res.seconds:.0f}s; checkpoint {res.checkpoint}")
