"""Two-process DistributedDataParallel training through torchrun (gloo on CPU), bounded in time.

The test launches ``python -m torch.distributed.run --nproc-per-node 2 -m tests.test_train_ddp OUT``;
each rank runs ``train_from_cache`` on the same in-memory synthetic cache and writes what it saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(out: str) -> None:
    """What each torchrun rank runs."""
    import torch

    from mfdetr.train.loop import train_from_cache
    from tests.synth_batches import SyntheticCache
    from tests.tiny_train import small_train

    # threads=0 (auto): the cores per process, which the test checks
    cfg = small_train(warmup_iters=1, threads=0)
    res = train_from_cache(
        SyntheticCache(16), Path(out) / "run", cfg, val_cache=SyntheticCache(4, seed=9), progress=False
    )
    rank = int(os.environ["RANK"])
    from mfdetr.model.checkpoint import read_checkpoint

    ck = read_checkpoint(Path(out) / "run" / "checkpoints" / "last.pt") if rank == 0 else None
    info = {
        "rank": rank,
        "world": int(os.environ["WORLD_SIZE"]),
        "steps": res.steps,
        "losses": res.losses,
        "threads": torch.get_num_threads(),
        "val_miou": res.val_miou,
        "ckpt_world": ck["world"] if ck else None,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(info))


def test_two_process_gloo_ddp_trains(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "tests.test_train_ddp",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # 16 images / (2 ranks x batch 4) = 2 steps per epoch, 2 epochs
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 4
    assert r0["losses"] != r1["losses"]  # each rank sees its own shard
    assert all(x == x for x in r0["losses"] + r1["losses"])  # finite
    assert r0["threads"] == 1  # cores / processes
    # only rank 0 writes; it holds the RNG of both ranks and validated
    ck = tmp_path / "run" / "checkpoints"
    assert {p.name for p in ck.iterdir()} == {"epoch_001.pt", "epoch_002.pt", "last.pt", "best.pt"}
    assert r0["ckpt_world"] == 2 and 0 <= r0["val_miou"] <= 1
    import torch

    ckpt = torch.load(ck / "last.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["type"] == "epoch" for m in metrics) == 2  # one writer


if __name__ == "__main__":
    _rank_main(sys.argv[1])
