#!/usr/bin/env python
"""Train the shipped ``shapes`` detector from scratch: a small RT-DETR (HF ``RTDetrForObjectDetection``).

The one documented command (writes mfdetr/detectors/weights/shapes/):

    python tools/train_shapes_detector.py

Budget: about 60 CPU-minutes of ONE thread (8000 steps x ~0.45 s); the wall time is that on an idle core and
grows when other jobs share the CPU (the log prints both). One thread is the default because OpenMP threads
stall badly when other processes compete for the cores; on an idle 2-core machine ``--threads 2`` is faster.

It generates ``make_synth(data/shapes_det, train=6000, val=300, size=192, seed=0)`` (skipped when already
there), trains for a FIXED number of steps (so the result does not depend on machine speed) with HF's own
RT-DETR loss (varifocal + L1 + GIoU, auxiliary decoder losses, encoder proposal loss and contrastive
denoising, computed by the model when it is given ``labels`` in train mode), AdamW, linear warmup then cosine
decay, gradient clipping 0.1, random flips and an EMA of the weights. Checkpoints go to ``--work`` every
``--ckpt-every`` steps; rerunning the same command resumes from the latest one. At the end the better of {EMA,
raw} weights on the seed-0 val split (never the acceptance split) is saved with ``save_pretrained`` together
with its image processor and a ``train_meta.json``.

Architecture (``--arch s8``): RT-DETR-ResNet backbone (basic blocks, widths 32-64-128-256, one block per
stage, BatchNorm trained), hybrid encoder over strides 8/16/32 (64 channels, one AIFI layer), 3 decoder layers
(d_model 128), 100 queries, 50 denoising queries; about 2.2M parameters. Measured here: feeding the encoder a
stride-4 level (``--arch s4``) left training on a plateau (box AP ~0.01 after 1000 steps): its 3000+ encoder
tokens make the top-k query selection too sparse to learn; 100 queries learned faster than 30.

The acceptance number (box AP on a 300-image val split of a seed never used in training) is measured
separately, through the same ``hf:`` adapter users get:

    python tools/eval_detector.py shapes --seed 1234 --images 300

This file parses the options and runs the stages; the code is in ``tools/shapes_detector/`` (``model``,
``data``, ``evaluation``, ``training``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shapes_detector package beside this file
from shapes_detector import log  # noqa: E402
from shapes_detector.data import ensure_data, load_split  # noqa: E402
from shapes_detector.model import ARCHS, CATEGORY_NAMES, build_config, build_processor  # noqa: E402, F401
from shapes_detector.training import STOPPED, Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# option -> default (its type is the default's); in the order --help lists them, --arch between the two tables
DATA_OPTIONS = {
    "--data": REPO / "data" / "shapes_det",
    "--out": REPO / "mfdetr" / "detectors" / "weights" / "shapes",
    "--work": REPO / "runs" / "shapes_det",
    "--train-images": 6000,
    "--val-images": 300,
    "--size": 192,
    "--seed": 0,
}
TRAIN_OPTIONS = {
    "--queries": 100,
    "--dec-layers": 3,
    "--steps": 8000,
    "--batch": 8,
    "--lr": 4e-4,
    "--backbone-lr-mult": 1.0,
    "--weight-decay": 1e-4,
    "--warmup": 200,
    "--final-lr-frac": 0.05,
    "--accept-seed": 1234,
    "--accept-images": 300,
    "--clip": 0.1,
    "--ema-decay": 0.999,
    "--threads": 1,
    "--ckpt-every": 200,
    "--eval-every": 500,
    "--eval-images": 100,
    "--log-every": 50,
    "--max-minutes": 0.0,
}
HELP = {
    "--accept-seed": "after saving: box AP through build_detector('hf:OUT') on make_synth(val=N, seed=this), "
    "a seed never used in training (-1 = skip)",
    "--threads": "1 is fastest whenever other jobs share the CPU (OpenMP barriers stall under contention)",
    "--max-minutes": "safety stop: checkpoint and exit after this many minutes (0 = none); rerun to resume",
    "--export-only": "save the latest checkpoint's EMA weights to --out as an HF folder, without training",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(options: dict) -> None:
        for name, default in options.items():
            kind = Path if isinstance(default, Path) else type(default)
            ap.add_argument(name, type=kind, default=default, help=HELP.get(name))

    add(DATA_OPTIONS)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="s8")
    add(TRAIN_OPTIONS)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--export-only", action="store_true", help=HELP["--export-only"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import RTDetrForObjectDetection
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    ensure_data(args.data, args.train_images, args.val_images, args.size, args.seed)
    t0 = time.time()
    tr_pix, tr_t, cats = load_split(args.data / "train", args.size)
    va_pix, va_t, _ = load_split(args.data / "val", args.size, limit=args.eval_images)
    names = [c["name"] for c in cats]
    loaded = f"loaded {len(tr_pix)} train / {len(va_pix)} val images in {time.time() - t0:.0f}s"
    log(f"{loaded}; categories {names}")
    id2label = {i: n for i, n in enumerate(names)}

    config = build_config(len(names), id2label, args.size, args.arch, args.queries, args.dec_layers)
    torch.manual_seed(args.seed)
    model = RTDetrForObjectDetection(config)
    model.train()
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    trainer = Trainer(model, args)
    trainer.resume()
    if args.export_only:
        return trainer.export_ema()
    if trainer.run(tr_pix, tr_t, va_pix, va_t) == STOPPED:
        return STOPPED
    trainer.finish(va_pix, va_t, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
