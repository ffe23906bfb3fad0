"""``mfdetr train-from-cache``: train the mask network from a cache (no detector, no images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mfdetr.cli.app import app


def build_train_config(config: Optional[Path], sets: list[str], explicit: dict[str, Any]) -> Any:
    """TrainConfig = defaults <- TOML file (top level, or its ``[train]`` table) <- ``--set`` <- options."""
    from mfdetr.train.config import TrainConfig
    from mfdetr.utils.config import apply_overrides, from_dict, load_toml

    data: dict[str, Any] = {}
    if config is not None:
        data = load_toml(config)
        if isinstance(data.get("train"), dict):  # a pipeline TOML: take its [train] table
            data = data["train"]
    data = apply_overrides(data, sets)
    for key, value in explicit.items():
        if value is not None:
            data[key] = value
    return from_dict(TrainConfig, data)


@app.command("train-from-cache")
def train_cmd(
    cache: str = typer.Option(..., "--cache", help="Train cache store (path or fsspec URL) made by `mfdetr extract` "
                              "with annotations (it holds the matched mask targets)."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints/ (epoch_XXX.pt, last.pt, best.pt), "
                             "metrics.jsonl, train_config.json."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML with TrainConfig fields (epochs, lr, \\[model], \\[loss], ...) at the top "
        "level or under \\[train] (a pipeline file works)."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=0, help="Passes over the train cache (default 4)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per step, per process (default 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW peak learning rate (default 2e-3)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="Mixed precision: bf16, fp16 (CUDA only) or off (default off)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader worker processes reading the cache "
                                          "(default 2; with a preload they only read it once)."),
    preload: Optional[str] = typer.Option(None, "--preload", help="Hold the decoded train/val caches in RAM: auto (when "
                                          "they fit preload_max_gb, default 4 GiB, and half the free memory), on, off "
                                          "(stream from the store every epoch). Default auto."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA if present), cpu, cuda, cuda:N (default auto)."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from OUT/checkpoints/last.pt (same loss sequence "
                                "as an uninterrupted run)."),
    val_cache: Optional[str] = typer.Option(None, "--val-cache", help="Validation cache: mean mask IoU of matched boxes "
                                            "(up to val_max_boxes_per_image per image, one per object first) each "
                                            "epoch; best.pt by it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the model init, sampler and per-step sampling (default 0)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=0, help="torch CPU threads (default 0 = auto: the cores "
                                          "per process left after the DataLoader workers -- all of them after a "
                                          "preload -- at least 1)."),
    sets: list[str] = typer.Option([], "--set", help="Override any TrainConfig field, dotted: --set model.dim=64 "
                                   "--set loss.num_points=512 --set schedule=step (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the tqdm bar (loss, images/s)."),
) -> None:
    """Train the mask network from a cache alone (no detector, no image decoding, no annotation file).

    Under `torchrun --nproc-per-node N -m mfdetr train-from-cache ...` it runs DistributedDataParallel
    (gloo on CPU, NCCL on GPU); rank 0 validates, logs and writes checkpoints.
    """
    from mfdetr.train.loop import train_from_cache
    from mfdetr.errors import MfdetrError

    if preload is not None and preload not in ("auto", "on", "off"):
        raise MfdetrError(f"--preload must be auto, on or off, got {preload!r}")
    if amp is not None and amp not in ("bf16", "fp16", "off"):
        raise MfdetrError(f"--amp must be bf16, fp16 or off, got {amp!r}")
    cfg = build_train_config(
        config, sets,
        {"epochs": epochs, "batch_size": batch_size, "lr": lr, "amp": amp, "workers": workers, "device": device,
         "seed": seed, "threads": threads, "preload": preload},
    )
    res = train_from_cache(cache, out, cfg, val_cache=val_cache, resume=resume, progress=progress)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        line = f"done: {res['steps']} steps, train loss {res['train_loss']:.4f}"
        if res.get("val_miou") == res.get("val_miou"):  # not NaN
            line += f", val mean mask IoU {res['val_miou']:.4f} (best {res['best_val_miou']:.4f})"
        typer.echo(line + f", {res['seconds']:.0f}s; checkpoint {res['checkpoint']}")
