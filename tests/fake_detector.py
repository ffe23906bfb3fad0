"""A deterministic, protocol-conforming fake FrozenDetector for tests (no weights, fast on CPU).

Everything is a pure function of the image content, so two runs (or two processes) give the same
bytes: the network input is the image resized (bilinear) so its longer side is ``max_size``; level
``fS`` (stride S) is the input average-pooled by S (ceil mode) and mixed into C channels by a fixed
seeded matrix; boxes come from connected components of pixels far from the image's median colour
(so they land on synth objects), plus shifted duplicates and a few grid boxes; queries encode the box
coordinates and the mean colour inside the box.

Use it as a detector spec ``py:tests.fake_detector:build`` (the repo root on ``sys.path``), or build
one directly: ``FakeDetector(categories=ds.categories, topk=20)``. ``MFDETR_FAKE_SLEEP`` (seconds per
image) slows ``detect`` down, for kill-and-resume tests; it does not change outputs or fingerprint.
``feature_scale`` multiplies the feature maps (e.g. 1e-9 to provoke float16 underflow).

Helpers for cache tests: ``make_small_synth`` (a tiny synth split), ``tree_bytes`` (every file of a
store, for byte-equality), ``subprocess_env`` (``python -m mfdetr`` children that can import this
module), ``serve_http`` (a thread serving a directory over http://127.0.0.1 with Range support, for
reading a cache by URL).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.detectors.base import DetectorOutput, LevelSpec
from mfdetr.utils.hashing import sha256_json

ALL_LEVELS = [LevelSpec("f4", 4, 6), LevelSpec("f8", 8, 8), LevelSpec("f16", 16, 8)]


class FakeDetector:
    """Deterministic stand-in for a frozen DETR (see module doc)."""

    def __init__(
        self,
        categories: list[dict[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        levels: list[str] | None = None,
        topk: int = 100,
        label_map: Any = None,
        max_size: int = 96,
        query_dim: int = 16,
        feature_scale: float = 1.0,
    ) -> None:
        names = [lv.name for lv in ALL_LEVELS]
        if levels is None:
            levels = ["f8", "f16"]
        unknown = [n for n in levels if n not in names]
        if unknown:
            raise ValueError(f"fake detector has no level(s) {unknown}; it has {names}")
        self.levels = [lv for lv in ALL_LEVELS if lv.name in levels]
        self.topk = int(topk)
        self.max_size = int(max_size)
        self.query_dim = int(query_dim)
        self.feature_scale = float(feature_scale)
        self.cat_ids = [int(c["id"]) for c in categories] if categories else [1, 2, 3]
        self.spec = "py:tests.fake_detector:build"
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(1234)
        self._mix = {
            lv.name: (torch.randn(lv.channels, 3, generator=g), torch.randn(lv.channels, generator=g))
            for lv in ALL_LEVELS
        }
        self.fingerprint = sha256_json(
            {
                "fake": 2,
                "levels": [lv.name for lv in self.levels],
                "topk": self.topk,
                "max_size": self.max_size,
                "query_dim": self.query_dim,
                "cats": self.cat_ids,
                "feature_scale": self.feature_scale,
            }
        )

    def to(self, device: str | torch.device) -> FakeDetector:
        self.device = torch.device(device)
        return self

    def input_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        h0, w0 = int(orig_size[0]), int(orig_size[1])
        s = self.max_size / max(h0, w0)
        return max(1, round(h0 * s)), max(1, round(w0 * s))

    @torch.inference_mode()
    def detect(self, images: list[Tensor]) -> list[DetectorOutput]:
        sleep = float(os.environ.get("MFDETR_FAKE_SLEEP", "0") or 0)
        outs = []
        for img in images:
            if sleep:
                time.sleep(sleep)
            outs.append(self._one(img.to("cpu")).to(self.device))
        return outs

    def _one(self, img: Tensor) -> DetectorOutput:
        from scipy import ndimage

        h0, w0 = int(img.shape[1]), int(img.shape[2])
        h_in, w_in = self.input_size((h0, w0))
        sx, sy = w_in / w0, h_in / h0
        x = F.interpolate(img[None].float() / 255.0, size=(h_in, w_in), mode="bilinear", align_corners=False)[
            0
        ]
        feats = {}
        for i, lv in enumerate(self.levels):
            # float64 then float32: results do not depend on the thread count (torchrun sets 1)
            p = F.avg_pool2d(x[None].double(), lv.stride, lv.stride, ceil_mode=True)[0]  # [3,h,w]
            w, b = self._mix[lv.name]
            f = torch.tanh(torch.einsum("ck,khw->chw", w.double(), p) + b.double()[:, None, None]) * (1.0 + i)
            f = (f * self.feature_scale).float()
            assert f.shape[1:] == (math.ceil(h_in / lv.stride), math.ceil(w_in / lv.stride))
            feats[lv.name] = f.contiguous()
        # boxes from components of "unusual" pixels (in the input frame), mapped to original pixels
        xn = x.numpy()
        med = np.median(xn.reshape(3, -1), axis=1)
        sal = np.abs(xn - med[:, None, None]).sum(0) > 0.45
        lab, ncomp = ndimage.label(sal)
        cand = []
        for sl in ndimage.find_objects(lab):
            if sl is None:
                continue
            y1, y2, x1, x2 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            if (y2 - y1) * (x2 - x1) >= 4:
                cand.append((x1, y1, x2, y2))
        cand.sort(key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b))
        cand = cand[:12]
        boxes = []
        for b in cand:
            boxes.append(b)
        for b in cand:  # shifted duplicates, as a real DETR's top-k has them
            dw, dh = 0.1 * (b[2] - b[0]), 0.1 * (b[3] - b[1])
            boxes.append((b[0] + dw, b[1] - dh, b[2] + dw, b[3] - dh))
        for j in range(3):  # a few grid boxes that rarely match anything
            boxes.append((j * w_in / 3, 0.0, (j + 1) * w_in / 3, h_in / 2))
        n = min(self.topk, len(boxes))
        bx = torch.tensor(boxes[:n], dtype=torch.float32).reshape(-1, 4)
        bx[:, 0::2] = (bx[:, 0::2] / sx).clamp(0, w0)
        bx[:, 1::2] = (bx[:, 1::2] / sy).clamp(0, h0)
        scores = torch.linspace(0.95, 0.05, max(n, 1))[:n].float()
        labels = torch.tensor(
            [self.cat_ids[(3 * j + ncomp) % len(self.cat_ids)] for j in range(n)], dtype=torch.int64
        )
        q = torch.zeros(n, self.query_dim)
        norm = bx / torch.tensor([w0, h0, w0, h0], dtype=torch.float32)
        for j in range(n):
            x1, y1, x2, y2 = (bx[j] * torch.tensor([sx, sy, sx, sy])).round().long().tolist()
            region = x[:, y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)]
            colour = region.reshape(3, -1).mean(1) if region.numel() else torch.zeros(3)
            enc = torch.cat(
                [norm[j], torch.sin(norm[j] * 6.28), torch.cos(norm[j] * 6.28), colour, scores[j : j + 1]]
            )
            q[j, : min(self.query_dim, enc.numel())] = enc[: self.query_dim]
        return DetectorOutput(
            boxes=bx,
            scores=scores,
            labels=labels,
            queries=q,
            features=feats,
            scale=(float(sx), float(sy)),
            input_size=(h_in, w_in),
            orig_size=(h0, w0),
        )


def build(**kwargs: Any) -> FakeDetector:
    """``py:tests.fake_detector:build`` factory (accepts the registry's keyword arguments)."""
    known = {"categories", "device", "levels", "topk", "label_map", "max_size", "query_dim", "feature_scale"}
    return FakeDetector(**{k: v for k, v in kwargs.items() if k in known})


# ------------------------------------------------------------------------------------------------
# small helpers shared by the cache / extract tests

SPEC = "py:tests.fake_detector:build"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_small_synth(root: Any, n: int = 10, size: int = 96, seed: int = 1) -> tuple[Any, Any]:
    """A tiny synth train split under ``root``; returns (images dir, annotations json)."""
    from pathlib import Path

    from mfdetr.data.synth import make_synth

    make_synth(Path(root), n, 0, size=size, seed=seed, workers=1)
    return Path(root) / "train" / "images", Path(root) / "train" / "annotations.json"


def tree_bytes(path: Any) -> dict[str, bytes]:
    """{relative path: bytes} of every file under a store directory (for byte-equality checks)."""
    from pathlib import Path

    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m mfdetr ...`` subprocesses that can import ``tests.fake_detector``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def serve_http(root: Any):
    """Context manager: serve directory ``root`` over http://127.0.0.1:<free port> (a thread) with HTTP
    Range support, as object stores and nginx do (``python -m http.server`` ignores Range, and Zarr
    shards need it). Yields the base URL."""
    import contextlib
    import functools
    import http.server
    import re
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def send_head(self):  # type: ignore[override]
            rng = self.headers.get("Range")
            if not rng:
                return super().send_head()
            path = self.translate_path(self.path)
            if not os.path.isfile(path):
                self.send_error(404)
                return None
            size = os.path.getsize(path)
            m = re.match(r"bytes=(\d*)-(\d*)$", rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                self.send_error(416)
                return None
            a, b = m.groups()
            if a == "":
                start, end = max(0, size - int(b)), size - 1
            else:
                start, end = int(a), (min(size - 1, int(b)) if b else size - 1)
            if start > end:
                self.send_error(416)
                return None
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start + 1)
            import io

            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return io.BytesIO(data)

    @contextlib.contextmanager
    def _serve():
        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # Zarr fetches ~20 objects at once; 5 drops SYNs (1 s retransmits)
            daemon_threads = True

        server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()

    return _serve()
