"""``--device`` for every command: parsed and checked once, with a clear error when the device is missing."""

from __future__ import annotations

import torch

from mfdetr.errors import MfdetrError
from mfdetr.utils.distributed import torchrun_env


def resolve_device(
    name: str | torch.device | None, local_rank: int | None = None, what: str = "--device"
) -> torch.device:
    """``auto`` (or empty): ``cuda:local_rank`` when CUDA is available, else CPU; explicit names are checked.

    ``cuda`` without an index becomes ``cuda:local_rank`` (torchrun's ``LOCAL_RANK`` by default). Raises
    ``MfdetrError`` for an unknown name, CUDA (or MPS) asked for but unavailable, or a GPU index that does
    not exist."""
    local = torchrun_env().local_rank if local_rank is None else int(local_rank)
    text = str(name if name is not None else "auto").strip()
    if text in ("", "auto"):
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise MfdetrError(
            f"{what} {text!r} is not a torch device ({e}); use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise MfdetrError(f"{what} {text}: CUDA is not available ({why}); use {what} cpu (or auto)")
        if dev.index is None:
            dev = torch.device(f"cuda:{local}")
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise MfdetrError(f"{what} {text}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MfdetrError(f"{what} {text}: MPS is not available on this machine; use {what} cpu")
    return dev
