"""The one-GPU suite (issue 14): every CUDA path of mfdetr measured in ONE command, one table, one JSON.

    python benchmarks/gpu_suite.py [--out DIR] [--device cuda|cpu] [--quick] [--budget S] [--only a,b]

Sections (each guarded: a failure prints its error in its row and the suite goes on):

- ``roi_align`` (a): the fused RoIAlign vs torchvision's per-level sum (``backend="fused"`` vs
  ``"torchvision"`` of ``multilevel_roi_align``): equality with the definition in float64 (the
  ``torchvision`` backend on float64 copies) (fp32 and bf16 inputs, values and feature gradients),
  fwd / fwd+bwd times (CUDA events, warm-up, min / median of several runs) at the sizes of
  ``benchmarks/roi_align.py`` plus 8 x 100 boxes at
  800x1333, S=32; the last row says which backend ``auto`` should run on this device;
- ``extract`` (b): the detector forward alone vs the whole ``extract`` (writers included), images/s, for
  the shipped ``shapes`` detector and a random-weight RT-DETR R50 at 640;
- ``train`` (c): ``train_from_cache`` fp32 vs bf16 autocast on the same cache: images/s, finite losses,
  val mean mask IoU (bf16 within 0.01 of fp32), loader vs step images/s;
- ``step_vs_live`` (d): the training step from the cache vs the live step (detector forward + the same
  step), RT-DETR R50 at 640 and a paper-class two-stage Deformable DETR with a Swin-L backbone at 800x1333;
- ``evaluate`` (e): ``evaluate`` of the (c) checkpoint on the val cache, images/s.

``--budget`` bounds the whole run (default 450 s: the suite must finish in 8 minutes on one H200); each
section also has a cap (SIGALRM) and every timing loop stops at its deadline. The JSON
(``gpu_suite.json`` under ``--out``, default ``$OUT``) is rewritten after every section, so a run killed
midway still leaves its rows. ``--device cpu --quick`` runs the same code on tiny sizes
(tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the section modules beside this file
from _common import column  # noqa: E402

SECTIONS = ("roi_align", "extract", "train", "step_vs_live", "evaluate")
SHORT = dict(zip("abcde", SECTIONS))


@dataclass
class Profile:
    """Every size the suite runs at (``full`` on a GPU, ``quick`` for the CPU test)."""

    quick: bool
    roi_sizes: tuple  # (name, img_h, img_w, images, boxes per image, S, channels)
    roi_runs: int
    roi_warmup: int
    synth_size: int  # shapes images (px)
    n_train: int
    n_val: int
    n_r50: int
    r50_size: int
    n_paper: int
    paper_hw: tuple[int, int]
    epochs: int
    batch: int
    step_iters: int
    section_cap_s: float
    workers: int
    writers: int | None  # None: extract's default


# field: (full, on a GPU; quick, the CPU test); roi_sizes: see Profile
SIZES = {
    "roi_sizes": (
        (
            ("a 4x50 S14 800x1088", 800, 1088, 4, 50, 14, 256),
            ("b 8x100 S32 800x1088", 800, 1088, 8, 100, 32, 256),
            ("c 8x100 S32 800x1333", 800, 1333, 8, 100, 32, 256),
        ),
        (("a 2x6 S7 64x96", 64, 96, 2, 6, 7, 16), ("c 2x8 S8 80x128", 80, 128, 2, 8, 8, 16)),
    ),
    "roi_runs": (10, 2),
    "roi_warmup": (3, 1),
    "synth_size": (192, 64),
    "n_train": (256, 4),
    "n_val": (64, 2),
    "n_r50": (32, 2),
    "r50_size": (640, 96),
    "n_paper": (8, 2),
    "paper_hw": ((800, 1333), (96, 160)),
    "epochs": (4, 1),
    "batch": (8, 2),
    "step_iters": (6, 2),
    "section_cap_s": (150.0, 150.0),
    "workers": (4, 0),
    "writers": (None, 0),
}
FULL = Profile(quick=False, **column(SIZES, 0))
QUICK = Profile(quick=True, **column(SIZES, 1))


class Budget:
    """The whole run's deadline and the current section's."""

    def __init__(self, total_s: float, section_cap_s: float) -> None:
        self.t0 = time.monotonic()
        self.total = total_s
        self.cap = section_cap_s
        self.section_end = self.t0 + total_s

    def left(self) -> float:
        return self.t0 + self.total - time.monotonic()

    def start_section(self) -> float:
        self.section_end = time.monotonic() + max(1.0, min(self.cap, self.left()))
        return self.section_end - time.monotonic()

    def over(self) -> bool:
        """Past the current section's soft deadline (timing loops stop; 10% of the cap kept for wrap-up)."""
        return time.monotonic() > self.section_end - 0.1 * self.cap


class SectionTimeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise SectionTimeout("section cap reached")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], Any], device: torch.device, runs: int, warmup: int, budget: Budget
) -> list[float]:
    """Seconds of ``fn()`` per run (CUDA events on a GPU, else wall), after ``warmup`` calls; stops early
    (at least one timed run) when the section's deadline passes."""
    for _ in range(warmup):
        fn()
    sync(device)
    out: list[float] = []
    for _ in range(runs):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        if budget.over():
            break
    return out


class Context:
    """What the sections share: device, profile, budget, a work folder and lazily built resources
    (detectors, synth data, caches), each built once by whichever section needs it first."""

    def __init__(self, device: torch.device, prof: Profile, budget: Budget, work: Path) -> None:
        self.device, self.prof, self.budget, self.work = device, prof, budget, work
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def finite(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| section | row | status | figures |")
    print("|---|---|---|---|")
    for r in rows:
        figs = ", ".join(
            f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("section", "name", "ok", "error")
        )
        status = "ok" if r.get("ok") else f"FAILED: {r.get('error')}"
        print(f"| {r['section']} | {r['name']} | {status} | {figs} |")
    sys.stdout.flush()


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import torchvision
        import transformers

        env["torchvision"], env["transformers"] = torchvision.__version__, transformers.__version__
    except Exception:  # pragma: no cover - reported only
        pass
    return env


def run_section(name: str, ctx: Context) -> list[dict[str, Any]]:
    import gpu_suite_roi
    import gpu_suite_stages

    fn = {
        "roi_align": gpu_suite_roi.section,
        "extract": gpu_suite_stages.section_extract,
        "train": gpu_suite_stages.section_train,
        "step_vs_live": gpu_suite_stages.section_step_vs_live,
        "evaluate": gpu_suite_stages.section_evaluate,
    }[name]
    if ctx.budget.left() < 5:
        return [
            {"section": name, "name": "-", "ok": False, "error": "skipped: the suite's time budget is spent"}
        ]
    cap = ctx.budget.start_section()
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, cap)
    t = time.monotonic()
    try:
        rows = fn(ctx)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the section's row
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        rows = [{"section": name, "name": "-", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}]
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    for r in rows:
        r.setdefault("section", name)
    print(
        f"[gpu_suite] {name}: {len(rows)} row(s) in {time.monotonic() - t:.1f}s", file=sys.stderr, flush=True
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder of gpu_suite.json (default $OUT, else .)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test)")
    ap.add_argument("--budget", type=float, default=None, help="whole-suite seconds (default 450, quick 400)")
    ap.add_argument("--only", default="", help="sections to run, by name or letter a-e (comma-separated)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep data, caches and runs here (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here; use --device cpu --quick")
    prof = QUICK if args.quick else FULL
    wanted = [SHORT.get(s.strip(), s.strip()) for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section(s) {bad}; use {', '.join(SECTIONS)} or a-e")
    out = args.out or Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    # --quick: 400 s (the CPU test on a shared machine)
    budget = Budget(args.budget or (400.0 if prof.quick else 450.0), prof.section_cap_s)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mfdetr_gpu_suite_")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if prof.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: OpenMP teams spin-wait for descheduled partners
    ctx = Context(device, prof, budget, work)
    report: dict[str, Any] = {"environment": environment(device), "profile": asdict(prof), "rows": []}
    print(f"[gpu_suite] {report['environment']}", file=sys.stderr, flush=True)
    try:
        for name in wanted:
            report["rows"] += run_section(name, ctx)
            report["seconds"] = round(time.monotonic() - budget.t0, 1)
            (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(report["rows"])
    print(f"\n{report['environment']}; {report.get('seconds', 0):.0f} s; JSON: {out / 'gpu_suite.json'}")
    return 0 if all(r.get("ok") for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
