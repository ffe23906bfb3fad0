"""Cache size vs fidelity for each storage option, on two detectors whose features compress differently.

    python benchmarks/cache_storage.py [--quick] [--images N] [--r50-images M] [--no-r50]

For each option (dtype x codec x BitRound keepbits) the same detector outputs (computed once, then
replayed) are written with ``extract`` and read back with ``CacheDataset``. Columns:
- bytes/image: the whole store (every array + metadata) / images; feat+q: feature maps + queries only;
- ratio: feat+q bytes / raw float32 bytes of the same maps (true sizes) and queries;
- max rel err: max |x_hat - x| / max |x| over each array (worst array); rel RMS: ||x_hat - x|| / ||x||
  per array (each feature level, the queries), the worst one shown with its name, vs the float32
  detector output;
- write ms/img: writer-thread time per image (matching + conversion + compression + writes);
- warn: extract warned that float16 loses a level (values below its normal range).
Detectors: the shipped ``shapes`` detector (its random-weight architecture until the weights exist)
on 192 px synth images, and a random-init RT-DETR R50 at 640x640 (COCO resolution) on synth images
rendered at 640 px.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_overhead import CATEGORY_NAMES, r50_detector, shapes_detector, synth_data  # noqa: E402

# (name, dtype, codec, keepbits)
OPTIONS = [
    ("float32 none", "float32", "none", None),
    ("float32 zstd", "float32", "zstd", None),
    ("float32 lz4", "float32", "lz4", None),
    ("float16 none", "float16", "none", None),
    ("float16 zstd", "float16", "zstd", None),
    ("float16 lz4", "float16", "lz4", None),
    ("float16 blosc-zstd", "float16", "blosc-zstd", None),
    ("bfloat16 zstd", "bfloat16", "zstd", None),
    ("bfloat16 lz4", "bfloat16", "lz4", None),
    ("float32 BitRound10 zstd", "float32", "zstd", 10),
    ("float32 BitRound7 zstd", "float32", "zstd", 7),
    ("float32 BitRound5 zstd", "float32", "zstd", 5),
    ("float16 BitRound7 zstd", "float16", "zstd", 7),
    ("float16 BitRound5 zstd", "float16", "zstd", 5),
    ("float16 BitRound5 lz4", "float16", "lz4", 5),
    ("bfloat16 BitRound5 zstd", "bfloat16", "zstd", 5),
]
QUICK = {"float32 zstd", "float16 zstd", "float16 lz4", "bfloat16 zstd", "float32 BitRound10 zstd",
         "float32 BitRound7 zstd", "float32 BitRound5 zstd", "float16 BitRound5 zstd"}


class ReplayDetector:
    """Wraps a detector; each distinct image is run once, later calls replay the stored outputs."""

    def __init__(self, det) -> None:
        self.det = det
        self.memo: dict[str, object] = {}
        for k in ("spec", "levels", "query_dim", "fingerprint", "device"):
            setattr(self, k, getattr(det, k))

    def input_size(self, orig):
        return self.det.input_size(orig)

    def to(self, device):
        return self

    @staticmethod
    def _key(img: torch.Tensor) -> str:
        return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()

    def detect(self, images):
        todo = [im for im in images if self._key(im) not in self.memo]
        if todo:
            for im, o in zip(todo, self.det.detect(todo)):
                self.memo[self._key(im)] = o.to("cpu")
        return [self.memo[self._key(im)] for im in images]


def run_detector(name: str, det, images_dir: Path, ann: Path, work: Path, options) -> list[str]:
    from mfdetr.cache.inspect import cache_info, raw_float32_bytes
    from mfdetr.cache.reader import CacheDataset
    from mfdetr.data.coco import CocoDataset
    from mfdetr.extract.loop import ExtractOptions, extract

    ds = CocoDataset(ann, images_dir)
    rep = ReplayDetector(det)
    t0 = time.perf_counter()
    truth = [rep.detect([ds[i].image])[0] for i in range(len(ds))]
    fwd = time.perf_counter() - t0
    n = len(ds)
    rows = []
    for label, dtype, codec, keepbits in options:
        out = work / f"storage_{label.replace(' ', '_')}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        res = extract(rep, images_dir, ann, out=str(out), opts=ExtractOptions(dtype=dtype, codec=codec,
                      keepbits=keepbits), batch_size=2, workers=0, progress=False)
        info = cache_info(out)
        per = info["bytes_by_array"]
        fq = sum(v for k, v in per.items() if k.startswith("feat/") or k == "queries")
        cache = CacheDataset(out, load_targets=False)
        err2: dict[str, float] = {}
        ref2: dict[str, float] = {}
        maxrel = 0.0
        for j in range(n):
            r = cache[j]
            o = truth[j]
            k = o.queries.shape[0]
            pairs = [(nm, r["features"][nm], o.features[nm].float()) for nm in o.features]
            pairs.append(("queries", r["queries"][:k], o.queries.float()))
            for nm, got, ref in pairs:
                d = got.double() - ref.double()
                err2[nm] = err2.get(nm, 0.0) + float((d * d).sum())
                ref2[nm] = ref2.get(nm, 0.0) + float((ref.double() ** 2).sum())
                if d.numel():  # max |error| relative to the array's max |value|
                    maxrel = max(maxrel, float(d.abs().max()) / max(float(ref.abs().max()), 1e-38))
        rel = {nm: np.sqrt(err2[nm] / max(ref2[nm], 1e-300)) for nm in err2}
        worst = max(rel, key=rel.get)
        raw = raw_float32_bytes(info, np.asarray(cache._get_group()["feat_size"][:]))
        note = f" ({worst})" if rel[worst] > 0 else ""
        rows.append(
            f"| {name} | {label} | {info['bytes_per_image'] / 1e3:,.1f} kB | {fq / n / 1e3:,.1f} kB | "
            f"{fq / n / raw:.3f} | {maxrel:.2e} | {rel[worst]:.2e}{note} | {1e3 * res.timings['write'] / n:.1f} |"
            + (" f16 warning |" if res.warnings else " |")
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"({name}: {n} images, detector forward {fwd:.1f}s, raw float32 features+queries "
          f"{raw / 1e3:,.1f} kB/image)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer options and images, no R50")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--r50-images", type=int, default=2)
    ap.add_argument("--no-r50", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--detector", default=None, help="detector spec for the 192 px rows (default: shapes, or its "
                    "random-weight architecture while the shipped weights are missing)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mfdetr_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    options = [o for o in OPTIONS if not args.quick or o[0] in QUICK]
    cats = [{"id": i + 1, "name": nm} for i, nm in enumerate(CATEGORY_NAMES)]
    header = ("| detector | storage | bytes/image | feat+q bytes/image | ratio to raw f32 | max rel err "
              "| rel RMS err (worst array) | write ms/img | warn |\n|---|---|---|---|---|---|---|---|---|")
    print(header)
    n = 6 if args.quick else args.images
    images_dir, ann = synth_data(work / f"synth{n}", n)
    det, desc = shapes_detector(cats, workdir=work, spec=args.detector)
    rows = run_detector("shapes 192px", det, images_dir, ann, work, options)
    print(f"shapes detector: {desc}; levels {[(lv.name, lv.stride, lv.channels) for lv in det.levels]}")
    if not args.quick and not args.no_r50:
        det50, desc50 = r50_detector(cats, workdir=work)
        images50, ann50 = synth_data(work / f"synth640_{args.r50_images}", args.r50_images, size=640, seed=12)
        rows += run_detector("R50 640px", det50, images50, ann50, work, options)
        print(f"R50 detector: {desc50}; levels {[(lv.name, lv.stride, lv.channels) for lv in det50.levels]}")
    print()
    print(header)
    print("\n".join(rows))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
