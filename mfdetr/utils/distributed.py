"""torchrun / DistributedDataParallel helpers (gloo on CPU, NCCL on GPU); no-ops in one process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mfdetr.errors import MfdetrError


@dataclass
class DistInfo:
    """rank / world size / local rank, and whether this call initialised the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun says about this process: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``
    (processes on this machine; defaults to the world size) and ``MASTER_ADDR`` (None when unset)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    master_addr: str | None = None

    @property
    def launched(self) -> bool:
        """More than one process: torchrun (or an equivalent launcher) started this one."""
        return self.world > 1


def _env_int(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise MfdetrError(
            f"environment variable {name}={raw!r} is not an integer >= {minimum}; "
            "unset it, or launch with torchrun"
        )
    return value


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv:
    """Parse torchrun's environment (``os.environ`` by default) once; a 1-process TorchrunEnv when unset."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1, 1)
    return TorchrunEnv(
        rank=_env_int(env, "RANK", 0, 0),
        world=world,
        local_rank=_env_int(env, "LOCAL_RANK", 0, 0),
        local_world=_env_int(env, "LOCAL_WORLD_SIZE", world, 1),
        master_addr=env.get("MASTER_ADDR") or None,
    )


def init_distributed(device: torch.device) -> DistInfo:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (env://), else a 1-process DistInfo."""
    env = torchrun_env()
    if not env.launched:
        return DistInfo()
    local = env.local_rank
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        owns = True
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, owns_group=owns)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_mean(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Mean over ranks of a few floats (identity in one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world).tolist()


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
