"""The training side of checkpoints: RNG states, which checkpoint ``--resume`` continues from (last.pt,
else the newest complete epoch checkpoint), whether it fits this run, restoring it, and writing the
epoch's files. The format itself is :mod:`mfdetr.model.checkpoint`'s."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfdetr.errors import MfdetrError
from mfdetr.model.checkpoint import copy_checkpoint, read_checkpoint, save_checkpoint
from mfdetr.train.config import TrainConfig
from mfdetr.utils.config import to_dict


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in ckpt_dir.glob("epoch_*.pt"):
        m = re.fullmatch(r"epoch_(\d+)\.pt", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """-> (path, checkpoint, notes): ``last.pt`` unless it is missing or torn or an epoch checkpoint is
    newer; then the newest epoch checkpoint that reads. Notes say what was passed over and why."""
    last = ckpt_dir / "last.pt"
    notes: list[str] = []
    epochs = _epoch_files(ckpt_dir)
    if last.is_file():
        try:
            ck = read_checkpoint(last)
            if not epochs or epochs[0][0] <= int(ck["epoch"]):
                return last, ck, notes
            notes.append(f"{last} holds epoch {ck['epoch']} but {epochs[0][1].name} is newer")
        except MfdetrError as e:
            notes.append(f"{last} is unreadable ({e})")
    else:
        notes.append(f"{last} is missing")
    for _, p in epochs:
        try:
            return p, read_checkpoint(p), notes
        except MfdetrError as e:
            notes.append(f"{p.name} is unreadable ({e})")
    raise MfdetrError(
        f"--resume: no checkpoint at {last} nor any readable epoch_XXX.pt in {ckpt_dir} "
        f"({'; '.join(notes)}); start without --resume"
    )


def check_resumable(ckpt: dict[str, Any], path: Path, ds: Any, cfg: TrainConfig, cache: Any) -> None:
    """Refuse a checkpoint of another model config, another cache, or of this cache at another size
    (an extract finished or grew it since: the steps per epoch and the schedule would change)."""
    if ckpt["model_config"] != to_dict(cfg.model):
        raise MfdetrError(
            f"--resume: the model config differs from the checkpoint's ({path}): checkpoint "
            f"{ckpt['model_config']} vs now {to_dict(cfg.model)}"
        )
    fp_ck, fp = ckpt["cache"].get("fingerprint"), getattr(ds, "fingerprint", None)
    if fp_ck and fp and fp_ck != fp:
        raise MfdetrError(
            f"--resume: checkpoint {path} was trained on cache fingerprint {fp_ck[:12]} but {cache} "
            f"has fingerprint {str(fp)[:12]}"
        )
    n_ck = int(ckpt["cache"]["num_images"])
    if n_ck != len(ds):
        raise MfdetrError(
            f"--resume: checkpoint {path} was trained on {n_ck} images of the train cache but {cache} now "
            f"has {len(ds)} (an extract grew it, or records are skipped as damaged): the steps per epoch, "
            "the sampler's order and the LR schedule would change, so the run cannot continue exactly; "
            "start a new run (another --out) on this cache"
        )


def restore(
    ckpt: dict[str, Any], model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, info: Any
) -> tuple[int, int, float, str]:
    """Load every training state of ``ckpt``; -> (epochs done, steps done, best val mIoU, a note)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if len(rngs) == info.world:
        set_rng_state(rngs[info.rank])
        note = (
            f"RNG states of {len(rngs)} rank(s) (torch, numpy, python{', cuda' if 'cuda' in rngs[0] else ''})"
        )
    else:
        set_rng_state(rngs[0])
        note = f"RNG of rank 0 only (checkpoint from {len(rngs)} ranks, now {info.world}: not exact)"
    return int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["best"]), note


def write_epoch_checkpoints(ckpt: dict[str, Any], ckpt_dir: Path, improved: bool) -> Path:
    """``epoch_XXX.pt``, then atomic copies as ``last.pt`` (and ``best.pt`` when ``improved``)."""
    path = save_checkpoint(ckpt, ckpt_dir / f"epoch_{int(ckpt['epoch']):03d}.pt")
    copy_checkpoint(path, ckpt_dir / "last.pt")
    if improved:
        copy_checkpoint(path, ckpt_dir / "best.pt")
    return path
