"""Random-access read throughput of a cache (images/s) with 0 and 2 DataLoader workers.

    python benchmarks/cache_read.py [--quick] [--images N] [--r50] [--epochs E]

A cache is extracted once per storage option (the detector runs once; outputs are replayed), then a
``DataLoader(CacheDataset, batch_size=8, shuffle=True, num_workers=W, collate_fn=ds.collate)``
reads every image per epoch, in random order: records decoded to float32, mask targets unpacked,
batches padded and stacked. Reported: best epoch images/s (the machine is shared) and MB/s of
decoded float32 features. ``--r50`` adds an R50-class cache at 640x640 (about 17 MB per image in
float16).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_workdir_detector_options  # noqa: E402
from cache_storage import ReplayDetector  # noqa: E402
from extract_overhead import CATEGORY_NAMES, r50_detector, shapes_detector, synth_data  # noqa: E402

OPTIONS = [
    ("float16 zstd", "float16", "zstd"),
    ("float16 lz4", "float16", "lz4"),
    ("float16 none", "float16", "none"),
    ("bfloat16 zstd", "bfloat16", "zstd"),
]


def read_rate(path: Path, workers: int, epochs: int, batch_size: int = 8) -> tuple[float, float]:
    from mfdetr.cache.reader import CacheDataset

    ds = CacheDataset(path)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=ds.collate,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    best = 0.0
    mb = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        nbytes = 0
        for b in loader:
            n += int(b["image_id"].shape[0])
            nbytes += sum(int(f.numel()) * 4 for f in b["features"].values())
        dt = time.perf_counter() - t0
        if n / dt > best:
            best, mb = n / dt, nbytes / dt / 1e6
    return best, mb


def bench(
    name: str, det, images_dir: Path, ann: Path, work: Path, options, epochs: int, batch_size: int
) -> list[str]:
    from mfdetr.cache.inspect import cache_info
    from mfdetr.extract.loop import ExtractOptions, extract

    rep = ReplayDetector(det)
    rows = []
    for label, dtype, codec in options:
        out = work / f"read_{label.replace(' ', '_')}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        extract(
            rep,
            images_dir,
            ann,
            out=str(out),
            opts=ExtractOptions(dtype=dtype, codec=codec),
            batch_size=2,
            workers=0,
            progress=False,
        )
        info = cache_info(out)
        r0, m0 = read_rate(out, 0, epochs, batch_size)
        r2, m2 = read_rate(out, 2, epochs, batch_size)
        rows.append(
            f"| {name} | {label} | {info['images_done']} | {info['bytes_per_image'] / 1e3:,.0f} kB | "
            f"{r0:.1f} ({m0:.0f} MB/s) | {r2:.1f} ({m2:.0f} MB/s) |"
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 images, 2 options, no R50")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--r50", action="store_true", help="also an R50-class cache at 640x640 (slow to extract on CPU)"
    )
    ap.add_argument("--r50-images", type=int, default=4)
    add_workdir_detector_options(ap)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mfdetr_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": nm} for i, nm in enumerate(CATEGORY_NAMES)]
    n = 16 if args.quick else args.images
    options = OPTIONS[:2] if args.quick else OPTIONS
    header = (
        "| cache | storage | images | bytes/image | 0 workers: images/s (decoded feature MB/s) | "
        "2 workers: images/s (decoded feature MB/s) |\n|---|---|---|---|---|---|"
    )
    print(
        f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, shuffled, best of {args.epochs} epochs"
    )
    print(header)
    images_dir, ann = synth_data(work / f"synth{n}", n)
    det, desc = shapes_detector(cats, workdir=work, spec=args.detector)
    rows = bench("shapes 192px", det, images_dir, ann, work, options, args.epochs, args.batch_size)
    if args.r50 and not args.quick:
        det50, _ = r50_detector(cats, workdir=work)
        images50, ann50 = synth_data(work / f"synth640_{args.r50_images}", args.r50_images, size=640, seed=12)
        rows += bench(
            "R50 640px", det50, images50, ann50, work, options[:2], args.epochs, min(args.batch_size, 2)
        )
    print()
    print(f"shapes detector: {desc}")
    print(header)
    print("\n".join(rows))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
