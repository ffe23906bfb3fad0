#!/usr/bin/env python
"""Train the shipped ``shapes`` detector: a small RT-DETR (Hugging Face ``RTDetrForObjectDetection``) from scratch.

The one documented command (writes mfdetr/detectors/weights/shapes/):

    python tools/train_shapes_detector.py

Budget: about 60 CPU-minutes of ONE thread (8000 steps x ~0.45 s); the wall time is that on an idle core and grows
when other jobs share the CPU (the log prints both). One thread is the default because OpenMP threads stall badly
when other processes compete for the cores; on an idle 2-core machine ``--threads 2`` is faster.

It generates ``make_synth(data/shapes_det, train=6000, val=300, size=192, seed=0)`` (skipped when already there),
trains for a FIXED number of steps (so the result does not depend on machine speed) with HF's own RT-DETR loss
(varifocal + L1 + GIoU, auxiliary decoder losses, encoder proposal loss and contrastive denoising, computed by the
model when it is given ``labels`` in train mode), AdamW, linear warmup then cosine decay, gradient clipping 0.1,
random flips and an EMA of the weights. Checkpoints go to ``--work`` every ``--ckpt-every`` steps; rerunning the
same command resumes from the latest one. At the end the better of {EMA, raw} weights on the seed-0 val split
(never the acceptance split) is saved with ``save_pretrained`` together with its image processor and a
``train_meta.json``.

Architecture (``--arch s8``): RT-DETR-ResNet backbone (basic blocks, widths 32-64-128-256, one block per stage,
BatchNorm trained), hybrid encoder over strides 8/16/32 (64 channels, one AIFI layer), 3 decoder layers (d_model
128), 100 queries, 50 denoising queries; about 2.2M parameters. Measured here: feeding the encoder a stride-4 level
(``--arch s4``) left training on a plateau (box AP ~0.01 after 1000 steps): its 3000+ encoder tokens make the
top-k query selection too sparse to learn; 100 queries learned faster than 30.

The acceptance number (box AP on a 300-image val split of a seed never used in training) is measured separately,
through the same ``hf:`` adapter users get:

    python tools/eval_detector.py shapes --seed 1234 --images 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CATEGORY_NAMES = ["disc", "square", "triangle", "star", "ring", "cross"]  # make_synth order, checked on load


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ----------------------------------------------------------------------------------------------- model


ARCHS = {
    # strides 4, 8, 16 into the encoder (half the objects are < 32 px); 3-stage backbone
    "s4": dict(
        emb=32, hidden=[32, 64, 128], depths=[1, 1, 1], out_indices=[1, 2, 3], strides=[4, 8, 16], enc=64
    ),
    # the usual RT-DETR layout: strides 8, 16, 32 into the encoder; the stride-4 stage stays reachable by a hook
    "s8": dict(
        emb=32,
        hidden=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        out_indices=[2, 3, 4],
        strides=[8, 16, 32],
        enc=64,
    ),
}


def build_config(
    num_labels: int,
    id2label: dict[int, str],
    size: int,
    arch: str = "s8",
    queries: int = 30,
    dec_layers: int = 3,
):
    """The shipped architecture: a small RT-DETR (about 2-3M parameters)."""
    from transformers import RTDetrConfig, RTDetrResNetConfig

    a = ARCHS[arch]
    enc_in = [a["hidden"][i - 1] for i in a["out_indices"]]
    backbone = RTDetrResNetConfig(
        embedding_size=a["emb"],
        hidden_sizes=a["hidden"],
        depths=a["depths"],
        layer_type="basic",
        out_indices=a["out_indices"],
    )
    return RTDetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        freeze_backbone_batch_norms=False,  # from scratch: BatchNorm must learn
        encoder_in_channels=enc_in,
        feat_strides=a["strides"],
        encoder_hidden_dim=a["enc"],
        encoder_ffn_dim=256,
        encoder_attention_heads=8,
        encoder_layers=1,
        hidden_expansion=1.0,
        d_model=128,
        decoder_in_channels=[a["enc"]] * 3,
        decoder_ffn_dim=512,
        decoder_layers=dec_layers,
        decoder_attention_heads=8,
        decoder_n_points=4,
        num_feature_levels=3,
        num_queries=queries,
        num_denoising=50,
        num_labels=num_labels,
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
        anchor_image_size=None,
    )


def build_processor(size: int):
    from transformers import RTDetrImageProcessor

    return RTDetrImageProcessor(size={"height": size, "width": size}, do_normalize=False, do_pad=False)


# ----------------------------------------------------------------------------------------------- data


def ensure_data(root: Path, train: int, val: int, size: int, seed: int) -> None:
    ok = (root / "train" / "annotations.json").exists() and (root / "val" / "annotations.json").exists()
    if ok:
        n_tr = len(json.loads((root / "train" / "annotations.json").read_text())["images"])
        n_va = len(json.loads((root / "val" / "annotations.json").read_text())["images"])
        if n_tr == train and n_va == val:
            return
    from mfdetr.data.synth import make_synth

    log(f"generating make_synth({root}, train={train}, val={val}, size={size}, seed={seed})")
    t = time.time()
    make_synth(root, train=train, val=val, size=size, seed=seed)
    log(f"generated in {time.time() - t:.0f}s")


def load_split(split_dir: Path, size: int, limit: int | None = None):
    """Images as one uint8 tensor [N,3,S,S] and targets (model label index, normalized cxcywh)."""
    from mfdetr.data.image_io import load_image

    ann = json.loads((split_dir / "annotations.json").read_text())
    cats = sorted(ann["categories"], key=lambda c: c["id"])
    cat_to_idx = {c["id"]: i for i, c in enumerate(cats)}
    images = sorted(ann["images"], key=lambda im: im["id"])
    if limit is not None:
        images = images[:limit]
    by_img: dict[int, list] = {}
    for a in ann["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    pix = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    targets = []
    for i, im in enumerate(images):
        arr = load_image(split_dir / "images" / im["file_name"]).permute(1, 2, 0).numpy()
        h, w = arr.shape[:2]
        if (h, w) != (size, size):
            raise SystemExit(f"{im['file_name']}: {h}x{w}, expected {size}x{size}")
        pix[i] = torch.from_numpy(arr).permute(2, 0, 1)
        lab, box = [], []
        for a in by_img.get(im["id"], []):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            lab.append(cat_to_idx[a["category_id"]])
            box.append([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
        targets.append(
            {
                "class_labels": torch.tensor(lab, dtype=torch.int64),
                "boxes": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
            }
        )
    return pix, targets, cats


def augment(x: torch.Tensor, t: dict, g: torch.Generator):
    """Random horizontal / vertical flips (the shapes keep their class under both)."""
    boxes = t["boxes"].clone()
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
        boxes[:, 0] = 1.0 - boxes[:, 0]
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-2)
        boxes[:, 1] = 1.0 - boxes[:, 1]
    return x, {"class_labels": t["class_labels"], "boxes": boxes}


# ----------------------------------------------------------------------------------------------- eval


@torch.inference_mode()
def quick_ap(model, pix: torch.Tensor, targets: list[dict], size: int, batch: int = 25) -> float:
    """COCO box AP (pycocotools) of the model's top-30 sigmoid detections, in the network frame."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    was_training = model.training
    model.eval()
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1} for i in range(model.config.num_labels)],
    }
    dets = []
    aid = 1
    for i, t in enumerate(targets):
        gt["images"].append({"id": i + 1, "height": size, "width": size})
        for lab, b in zip(t["class_labels"].tolist(), t["boxes"].tolist()):
            cx, cy, w, h = (v * size for v in b)
            gt["annotations"].append(
                {
                    "id": aid,
                    "image_id": i + 1,
                    "category_id": lab + 1,
                    "bbox": [cx - w / 2, cy - h / 2, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            aid += 1
    for s in range(0, len(pix), batch):
        out = model(pixel_values=pix[s : s + batch].float() / 255.0)
        prob = out.logits.sigmoid()
        n, q, c = prob.shape
        sc, idx = prob.flatten(1).topk(min(100, q * c), dim=1)
        lab = idx % c
        qi = idx // c
        bx = out.pred_boxes.gather(1, qi[..., None].expand(-1, -1, 4)) * size
        for j in range(n):
            for k in range(sc.shape[1]):
                cx, cy, w, h = bx[j, k].tolist()
                dets.append(
                    {
                        "image_id": s + j + 1,
                        "category_id": int(lab[j, k]) + 1,
                        "bbox": [cx - w / 2, cy - h / 2, w, h],
                        "score": float(sc[j, k]),
                    }
                )
    model.train(was_training)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        cdt = coco.loadRes(dets)
        ev = COCOeval(coco, cdt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    quick_ap.last_stats = [round(float(v), 3) for v in ev.stats]
    return float(ev.stats[0])


# ----------------------------------------------------------------------------------------------- train


def acceptance_ap(folder: Path, seed: int, images: int, size: int, data_root: Path) -> dict:
    """Box AP of the saved folder through the ``hf:`` adapter on a fresh synth val split of ``seed``."""
    from mfdetr.data.synth import make_synth
    from mfdetr.detectors.registry import build_detector
    from mfdetr.evaluate.coco_eval import detector_box_ap as box_ap

    root = data_root / f"synth_eval_seed{seed}_n{images}_s{size}"
    if not (root / "val" / "annotations.json").is_file():
        make_synth(root, train=0, val=images, size=size, seed=seed)
    ann = root / "val" / "annotations.json"
    det = build_detector(f"hf:{folder}", categories=json.loads(ann.read_text())["categories"])
    res = box_ap(det, ann, root / "val" / "images")
    return {"synth": f"make_synth(train=0, val={images}, size={size}, seed={seed})", **res}


class EMA:
    def __init__(self, model, decay: float, warmup: int):
        self.decay, self.warmup = decay, warmup
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = self.decay * (1 - math.exp(-step / self.warmup))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)


def lr_at(step: int, total: int, warmup: int, base: float, final_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "shapes_det")
    ap.add_argument("--out", type=Path, default=REPO / "mfdetr" / "detectors" / "weights" / "shapes")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "shapes_det")
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="s8")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--dec-layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--backbone-lr-mult", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--final-lr-frac", type=float, default=0.05)
    ap.add_argument(
        "--accept-seed",
        type=int,
        default=1234,
        help="after saving: box AP through build_detector('hf:OUT') on make_synth(val=N, seed=this), "
        "a seed never used in training (-1 = skip)",
    )
    ap.add_argument("--accept-images", type=int, default=300)
    ap.add_argument("--clip", type=float, default=0.1)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1 is fastest whenever other jobs share the CPU (OpenMP barriers stall under contention)",
    )
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-images", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="safety stop: checkpoint and exit after this many minutes (0 = none); rerun to resume",
    )
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="save the latest checkpoint's EMA weights to --out as an HF folder, without training",
    )
    args = ap.parse_args(argv)

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
    log(
        f"loaded {len(tr_pix)} train / {len(va_pix)} val images in {time.time() - t0:.0f}s; categories {names}"
    )
    id2label = {i: n for i, n in enumerate(names)}

    config = build_config(len(names), id2label, args.size, args.arch, args.queries, args.dec_layers)
    torch.manual_seed(args.seed)
    model = RTDetrForObjectDetection(config)
    model.train()
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model: {nparam / 1e6:.2f}M parameters")

    bb = [p for n, p in model.named_parameters() if n.startswith("model.backbone.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.backbone.")]
    no_decay = lambda ps: [p for p in ps if p.ndim <= 1]  # noqa: E731
    decay = lambda ps: [p for p in ps if p.ndim > 1]  # noqa: E731
    groups = [
        {"params": decay(bb), "lr_mult": args.backbone_lr_mult, "weight_decay": args.weight_decay},
        {"params": no_decay(bb), "lr_mult": args.backbone_lr_mult, "weight_decay": 0.0},
        {"params": decay(rest), "lr_mult": 1.0, "weight_decay": args.weight_decay},
        {"params": no_decay(rest), "lr_mult": 1.0, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    ema = EMA(model, args.ema_decay, warmup=500)

    g = torch.Generator().manual_seed(args.seed)
    step = 0
    wall = 0.0
    cpu0 = time.process_time()  # CPU seconds of this process: the budget that does not depend on other jobs
    cpu_prev = 0.0
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work / "last.pt"
    if ckpt_path.exists() and not args.no_resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        ema.state = ck["ema"]
        g.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, wall = ck["step"], ck["wall"]
        cpu_prev = ck.get("cpu", 0.0)
        log(f"resumed from {ckpt_path} at step {step} ({wall / 60:.1f} min trained)")

    def save_ckpt() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema.state,
                "gen": g.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "wall": wall,
                "cpu": cpu_prev + time.process_time() - cpu0,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    if args.export_only:
        if not ckpt_path.exists():
            raise SystemExit(f"no checkpoint at {ckpt_path}")
        model.load_state_dict(ema.state)
        model.eval()
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out, safe_serialization=True)
        build_processor(args.size).save_pretrained(args.out)
        log(f"exported EMA weights of step {step} to {args.out}")
        return 0

    n = len(tr_pix)

    # the epoch permutation is a pure function of (seed, epoch) so resuming mid-epoch is exact
    def batch_indices(s: int) -> torch.Tensor:
        e, off = divmod(s * args.batch, n)
        idx = []
        while len(idx) < args.batch:
            pe = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + e))
            take = pe[off : off + args.batch - len(idx)]
            idx.extend(take.tolist())
            e, off = e + 1, 0
        return torch.tensor(idx)

    run_start = time.time()
    seg_start = time.time()
    agg: dict[str, float] = {}
    aug_g = torch.Generator()
    while step < args.steps:
        lr = lr_at(step, args.steps, args.warmup, args.lr, args.final_lr_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr * grp["lr_mult"]
        idx = batch_indices(step)
        aug_g.manual_seed(args.seed * 7919 + step)
        xs, ts = [], []
        for i in idx.tolist():
            x, t = augment(tr_pix[i], tr_t[i], aug_g)
            xs.append(x)
            ts.append(t)
        x = torch.stack(xs).float() / 255.0
        out = model(pixel_values=x, labels=ts)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        ema.update(model, step)
        agg["loss"] = agg.get("loss", 0.0) + float(loss)
        agg["gnorm"] = agg.get("gnorm", 0.0) + float(gn)
        for k in ("loss_vfl", "loss_bbox", "loss_giou"):
            if k in out.loss_dict:
                agg[k] = agg.get(k, 0.0) + float(out.loss_dict[k])
        if step % args.log_every == 0:
            now = time.time()
            wall += now - seg_start
            seg_start = now
            msg = " ".join(f"{k}={v / args.log_every:.3f}" for k, v in agg.items())
            cpu = cpu_prev + time.process_time() - cpu0
            log(f"step {step}/{args.steps} lr={lr:.2e} {msg} wall={wall / 60:.1f}min cpu={cpu / 60:.1f}min")
            agg = {}
        if step % args.ckpt_every == 0 or step == args.steps:
            wall += time.time() - seg_start
            seg_start = time.time()
            save_ckpt()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            t = time.time()
            a = quick_ap(model, va_pix, va_t, args.size)
            log(
                f"step {step}: seed-{args.seed} val AP (first {len(va_pix)} images) = {a:.3f} [{time.time() - t:.0f}s]"
            )
            seg_start += time.time() - t  # evaluation time is not training time
        if args.max_minutes and (time.time() - run_start) / 60 > args.max_minutes:
            wall += time.time() - seg_start
            save_ckpt()
            log(f"--max-minutes reached at step {step}; rerun the same command to resume")
            return 3

    # pick EMA or raw weights on the seed-0 val split (never the acceptance split)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ap_raw = quick_ap(model, va_pix, va_t, args.size)
    model.load_state_dict(ema.state)
    ap_ema = quick_ap(model, va_pix, va_t, args.size)
    log(f"final seed-{args.seed} val AP: raw={ap_raw:.3f} ema={ap_ema:.3f}")
    if ap_raw > ap_ema:
        model.load_state_dict(raw)
    chosen = "ema" if ap_ema >= ap_raw else "raw"

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    build_processor(args.size).save_pretrained(args.out)
    meta = {
        "command": "python tools/train_shapes_detector.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": f"make_synth(train={args.train_images}, val={args.val_images}, size={args.size}, seed={args.seed})",
        "seed": args.seed,
        "arch": args.arch,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "parameters": nparam,
        "train_wall_minutes": round(wall / 60, 1),
        "process_cpu_minutes": round((cpu_prev + time.process_time() - cpu0) / 60, 1),
        "threads": args.threads,
        "weights": chosen,
        f"val_seed{args.seed}_ap_first{len(va_pix)}": {"raw": round(ap_raw, 4), "ema": round(ap_ema, 4)},
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (args.out / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    log(f"saved {args.out} ({size_mb:.1f} MB)")
    if args.accept_seed >= 0:
        meta["acceptance"] = acceptance_ap(
            args.out, args.accept_seed, args.accept_images, args.size, args.data.parent
        )
        meta["checkpoint_mb"] = round(size_mb, 1)
        (args.out / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        log(f"acceptance: {meta['acceptance']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
