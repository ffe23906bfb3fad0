"""The GPU suite (benchmarks/gpu_suite.py) runs on the CPU at its quick size, so it cannot rot between GPU
sessions; and the RoIAlign backends it compares agree on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfdetr.errors import MfdetrError
from mfdetr.ops import multilevel_roi_align
from mfdetr.ops.roi_align import BACKEND_ENV, resolve_backend

REPO = Path(__file__).resolve().parents[1]


def _figures(row: dict) -> list[float]:
    return [v for k, v in row.items() if isinstance(v, float) and k not in ("tol",)]


def test_gpu_suite_quick_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_suite.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = report["rows"]
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, f"failed rows: {failed}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = {r["section"] for r in rows}
    assert sections == {"roi_align", "extract", "train", "step_vs_live", "evaluate"}
    for r in rows:
        assert all(math.isfinite(v) for v in _figures(r)), r
    eq = [r for r in rows if r["name"].startswith("equal ")]
    # both backends, fp32 and bf16, two sizes
    assert len(eq) == 8 and all(r["equal"] and r["grad_dtype_ok"] for r in eq), eq
    times = [r for r in rows if r["name"].startswith("time ")]
    assert times and all(r["fused_ms_median"] > 0 and r["torchvision_ms_median"] > 0 for r in times)
    ext = [r for r in rows if r["section"] == "extract"]
    assert len(ext) == 2 and all(r["forward_img_s"] > 0 and r["extract_img_s"] > 0 for r in ext)
    train = {r["name"]: r for r in rows if r["section"] == "train"}
    assert all(r["losses_finite"] for n, r in train.items() if n.startswith("train-from-cache"))
    assert "bf16 vs fp32 val mIoU" in train
    live = [r for r in rows if r["section"] == "step_vs_live"]
    assert len(live) == 2 and all(r["live_step_ms"] > 0 and r["cache_step_ms"] > 0 for r in live)
    assert "| section | row | status | figures |" in proc.stdout


@pytest.mark.parametrize("per_level", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roi_align_backends_agree(per_level, dtype, one_thread):
    g = torch.Generator().manual_seed(3)
    feats = [
        torch.randn(2, 8, 20, 24, generator=g).to(dtype),
        torch.randn(2, 8, 10, 12, generator=g).to(dtype),
    ]
    rois = torch.tensor(
        [
            [0, 1.5, 2.0, 60.0, 70.0],
            [1, 10.0, 5.0, 90.0, 40.0],
            [1, -4.0, -3.0, 20.0, 100.0],
            [0, 30.0, 30.0, 30.5, 31.0],
        ]
    )
    scales = [0.25, 0.125]
    outs, grads = {}, {}
    up = None
    for backend in ("fused", "torchvision"):
        leaf = [f.clone().requires_grad_() for f in feats]
        out = multilevel_roi_align(leaf, rois, scales, 7, -1, True, per_level, backend=backend)
        up = (
            torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype) if up is None else up
        )
        out.backward(up)
        outs[backend], grads[backend] = out.detach().float(), [f.grad.float() for f in leaf]
        assert out.dtype == dtype and all(f.grad.dtype == dtype for f in leaf)
    # the definition, in float64: torchvision's kernel per level, summed
    wide = [f.double() for f in feats]
    ref = multilevel_roi_align(
        wide, rois.double(), scales, 7, -1, True, per_level, backend="torchvision"
    ).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = float(ref.abs().max())
    for backend in outs:
        assert float((outs[backend] - ref).abs().max()) <= tol * scale, backend
    for a, b in zip(grads["fused"], grads["torchvision"]):
        assert float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-6)


def test_roi_align_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, cpu) == "fused" and resolve_backend("auto", cpu) == "fused"
    assert resolve_backend("torchvision", cpu) == "torchvision"
    monkeypatch.setenv(BACKEND_ENV, "torchvision")
    assert resolve_backend(None, cpu) == "torchvision"
    assert resolve_backend("fused", cpu) == "fused"  # the argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(MfdetrError, match=BACKEND_ENV):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda-magic", cpu)
