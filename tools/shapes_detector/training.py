"""Training the shapes detector: optimizer, schedule, EMA, exact resume from checkpoints, the step loop, and
the final choice and save of the weights."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from shapes_detector import log
from shapes_detector.data import augment
from shapes_detector.evaluation import acceptance_ap, quick_ap
from shapes_detector.model import build_processor

STOPPED = 3  # exit code of a run stopped by --max-minutes (rerun to resume)


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


def build_optimizer(model, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over backbone / rest x decay / no decay (biases and norms) groups; ``lr_mult`` scales the LR."""
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
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Image indices of ``step``'s batch: the epoch permutation is a pure function of (seed, epoch), so
    resuming mid-epoch is exact."""
    e, off = divmod(step * batch, n)
    idx = []
    while len(idx) < batch:
        pe = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))
        take = pe[off : off + batch - len(idx)]
        idx.extend(take.tolist())
        e, off = e + 1, 0
    return torch.tensor(idx)


def save_folder(model, out: Path, size: int) -> None:
    """The model as a Hugging Face folder (``save_pretrained`` + its image processor)."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    build_processor(size).save_pretrained(out)


class Trainer:
    """The training state (model, optimizer, EMA, step, wall and CPU time), its checkpoint and the loop."""

    def __init__(self, model, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.opt = build_optimizer(model, args)
        self.ema = EMA(model, args.ema_decay, warmup=500)
        self.g = torch.Generator().manual_seed(args.seed)
        self.step = 0
        self.wall = 0.0
        self.cpu0 = (
            time.process_time()
        )  # CPU seconds of this process: the budget that does not depend on other jobs
        self.cpu_prev = 0.0
        args.work.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = args.work / "last.pt"
        self.seg_start = time.time()

    def cpu_seconds(self) -> float:
        return self.cpu_prev + time.process_time() - self.cpu0

    def resume(self) -> None:
        """Continue from ``--work``'s checkpoint when there is one (unless --no-resume)."""
        if not self.ckpt_path.exists() or self.args.no_resume:
            return
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.ema.state = ck["ema"]
        self.g.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        self.step, self.wall = ck["step"], ck["wall"]
        self.cpu_prev = ck.get("cpu", 0.0)
        log(f"resumed from {self.ckpt_path} at step {self.step} ({self.wall / 60:.1f} min trained)")

    def save_ckpt(self) -> None:
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "ema": self.ema.state,
                "gen": self.g.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": self.step,
                "wall": self.wall,
                "cpu": self.cpu_seconds(),
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            },
            tmp,
        )
        os.replace(tmp, self.ckpt_path)

    def export_ema(self) -> int:
        """--export-only: the checkpoint's EMA weights to --out."""
        if not self.ckpt_path.exists():
            raise SystemExit(f"no checkpoint at {self.ckpt_path}")
        self.model.load_state_dict(self.ema.state)
        save_folder(self.model, self.args.out, self.args.size)
        log(f"exported EMA weights of step {self.step} to {self.args.out}")
        return 0

    def _lap(self) -> None:
        """Add the time since the last lap to the training wall time."""
        now = time.time()
        self.wall += now - self.seg_start
        self.seg_start = now

    def _train_step(self, pix: torch.Tensor, targets: list[dict], aug_g: torch.Generator):
        """One optimizer step on ``self.step``'s batch (flipped); returns (lr, model output, grad norm)."""
        args = self.args
        lr = lr_at(self.step, args.steps, args.warmup, args.lr, args.final_lr_frac)
        for grp in self.opt.param_groups:
            grp["lr"] = lr * grp["lr_mult"]
        idx = batch_indices(self.step, len(pix), args.batch, args.seed)
        aug_g.manual_seed(args.seed * 7919 + self.step)
        xs, ts = [], []
        for i in idx.tolist():
            x, t = augment(pix[i], targets[i], aug_g)
            xs.append(x)
            ts.append(t)
        x = torch.stack(xs).float() / 255.0
        out = self.model(pixel_values=x, labels=ts)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
        self.opt.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return lr, out, gn

    def run(self, tr_pix, tr_t, va_pix, va_t) -> int:
        """Train to --steps (0), or checkpoint and stop when --max-minutes is reached (STOPPED)."""
        args = self.args
        run_start = time.time()
        self.seg_start = time.time()
        agg: dict[str, float] = {}
        aug_g = torch.Generator()
        while self.step < args.steps:
            lr, out, gn = self._train_step(tr_pix, tr_t, aug_g)
            agg["loss"] = agg.get("loss", 0.0) + float(out.loss)
            agg["gnorm"] = agg.get("gnorm", 0.0) + float(gn)
            for k in ("loss_vfl", "loss_bbox", "loss_giou"):
                if k in out.loss_dict:
                    agg[k] = agg.get(k, 0.0) + float(out.loss_dict[k])
            if self.step % args.log_every == 0:
                self._lap()
                msg = " ".join(f"{k}={v / args.log_every:.3f}" for k, v in agg.items())
                times = f"wall={self.wall / 60:.1f}min cpu={self.cpu_seconds() / 60:.1f}min"
                log(f"step {self.step}/{args.steps} lr={lr:.2e} {msg} {times}")
                agg = {}
            if self.step % args.ckpt_every == 0 or self.step == args.steps:
                self._lap()
                self.save_ckpt()
            if args.eval_every and self.step % args.eval_every == 0 and self.step < args.steps:
                t = time.time()
                a = quick_ap(self.model, va_pix, va_t, args.size)
                where = f"seed-{args.seed} val AP (first {len(va_pix)} images)"
                log(f"step {self.step}: {where} = {a:.3f} [{time.time() - t:.0f}s]")
                self.seg_start += time.time() - t  # evaluation time is not training time
            if args.max_minutes and (time.time() - run_start) / 60 > args.max_minutes:
                self._lap()
                self.save_ckpt()
                log(f"--max-minutes reached at step {self.step}; rerun the same command to resume")
                return STOPPED
        return 0

    def pick_weights(self, va_pix, va_t) -> dict:
        """Keep the better of {EMA, raw} on the seed's val split (never the acceptance split)."""
        raw = {k: v.clone() for k, v in self.model.state_dict().items()}
        ap_raw = quick_ap(self.model, va_pix, va_t, self.args.size)
        self.model.load_state_dict(self.ema.state)
        ap_ema = quick_ap(self.model, va_pix, va_t, self.args.size)
        log(f"final seed-{self.args.seed} val AP: raw={ap_raw:.3f} ema={ap_ema:.3f}")
        if ap_raw > ap_ema:
            self.model.load_state_dict(raw)
        return {"weights": "ema" if ap_ema >= ap_raw else "raw", "raw": ap_raw, "ema": ap_ema}

    def finish(self, va_pix, va_t, argv: list[str] | None) -> None:
        """Pick the weights, save them to --out with ``train_meta.json``, then the acceptance AP."""
        args = self.args
        picked = self.pick_weights(va_pix, va_t)
        save_folder(self.model, args.out, args.size)
        meta = {
            "command": "python tools/train_shapes_detector.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "data": f"make_synth(train={args.train_images}, val={args.val_images}, size={args.size}, "
            f"seed={args.seed})",
            "seed": args.seed,
            "arch": args.arch,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "train_wall_minutes": round(self.wall / 60, 1),
            "process_cpu_minutes": round(self.cpu_seconds() / 60, 1),
            "threads": args.threads,
            "weights": picked["weights"],
            f"val_seed{args.seed}_ap_first{len(va_pix)}": {k: round(picked[k], 4) for k in ("raw", "ema")},
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
