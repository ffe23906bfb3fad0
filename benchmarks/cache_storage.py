"""Cache size vs fidelity for each storage option, on three detectors whose features compress differently.

    python benchmarks/cache_storage.py [--quick] [--levers] [--images N] [--r50-images M] [--dino-images K]
                                       [--no-r50] [--no-dino] [--json PATH]

For each option (dtype x codec x BitRound keepbits, then the storage levers of mfdetr/cache/storage.py:
int8 quantization, PCA projection, box masking, and combinations) the same detector outputs (computed
once, then replayed) are written with ``extract`` and read back with ``CacheDataset``. Columns:
- bytes/image: the whole store (every array + metadata) / images; feat+q: feature maps (+ int8 params)
  + queries only; COCO train2017: bytes/image x 118,287;
- ratio: feat+q bytes / raw float32 bytes of the detector's (unprojected) maps at true size + queries;
- max rel err: max |x_hat - x| / max |x| over each array (worst array); rel RMS: ||x_hat - x|| / ||x||
  per array (each feature level, the queries), the worst one shown with its name, vs the float32
  detector output. A projected level is mapped back (x_hat = mu + B y: the PCA residual counts as
  error); a box-masked level is compared inside its kept region (outside is zero by design);
- write ms/img: writer-thread time per image (matching + conversion + compression + writes);
- read img/s/core: records decoded per second by one process on one thread;
- warn: extract warned that float16 loses a level (values below its normal range).
Detectors: the shipped ``shapes`` detector on 192 px synth images, a random-init RT-DETR R50 at 640x640
and a random-init DINO-style Deformable DETR R50 (two-stage, box refine, 900 queries) at 800x1333, on
synth images rendered at 640 / 800 px. ``--json PATH`` writes one object per row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_workdir_detector_options, two_stage_deformable_config  # noqa: E402
from extract_overhead import CATEGORY_NAMES, r50_detector, shapes_detector, synth_data  # noqa: E402

COCO_TRAIN2017 = 118_287


def _pca(levels, width: int, min_channels: int = 0) -> dict[str, int]:
    """Every level wider than ``width`` (and at least ``min_channels``) projected to ``width`` channels."""
    return {lv.name: width for lv in levels if lv.channels > width and lv.channels >= min_channels}


def _fine(levels) -> list[str]:
    return [min(levels, key=lambda lv: lv.stride).name]


# (name, options as a function of the detector's levels): dtype x codec x BitRound, then the storage levers
def _plain(dtype, codec, keepbits=None):
    return lambda levels: dict(dtype=dtype, codec=codec, keepbits=keepbits)


OPTIONS = [
    ("float32 none", _plain("float32", "none")),
    ("float32 zstd", _plain("float32", "zstd")),
    ("float32 lz4", _plain("float32", "lz4")),
    ("float16 none", _plain("float16", "none")),
    ("float16 zstd", _plain("float16", "zstd")),
    ("float16 lz4", _plain("float16", "lz4")),
    ("float16 blosc-zstd", _plain("float16", "blosc-zstd")),
    ("bfloat16 zstd", _plain("bfloat16", "zstd")),
    ("bfloat16 lz4", _plain("bfloat16", "lz4")),
    ("bfloat16 blosc-zstd (default codec)", _plain("bfloat16", "blosc-zstd")),
    ("float32 BitRound10 zstd", _plain("float32", "zstd", 10)),
    ("float32 BitRound7 zstd", _plain("float32", "zstd", 7)),
    ("float32 BitRound5 zstd", _plain("float32", "zstd", 5)),
    ("float16 BitRound7 zstd", _plain("float16", "zstd", 7)),
    ("float16 BitRound5 zstd", _plain("float16", "zstd", 5)),
    ("float16 BitRound5 lz4", _plain("float16", "lz4", 5)),
    ("bfloat16 BitRound5 zstd", _plain("bfloat16", "zstd", 5)),
    # storage levers (mfdetr/cache/storage.py)
    ("int8 zstd", lambda lv: dict(quant="int8")),
    ("int8-calib zstd", lambda lv: dict(quant="int8-calib")),
    ("int8 6-bit zstd", lambda lv: dict(quant="int8", quant_bits=6)),
    ("int8 lz4", lambda lv: dict(quant="int8", codec="lz4")),
    (
        "PCA 1/4 (>=64 ch) f16 zstd",
        lambda lv: dict(project={x.name: x.channels // 4 for x in lv if x.channels >= 64}),
    ),
    ("finest box-masked f16 zstd", lambda lv: dict(box_mask=_fine(lv))),
    ("PCA 32 f16 BitRound5 zstd", lambda lv: dict(project=_pca(lv, 32), keepbits=5)),
    ("int8 + PCA 64 zstd", lambda lv: dict(quant="int8", project=_pca(lv, 64))),
    ("int8 + PCA 32 zstd", lambda lv: dict(quant="int8", project=_pca(lv, 32))),
    ("int8-calib + PCA 32 zstd", lambda lv: dict(quant="int8-calib", project=_pca(lv, 32))),
    ("int8 6-bit + PCA 32 zstd", lambda lv: dict(quant="int8", quant_bits=6, project=_pca(lv, 32))),
    (
        "int8 6-bit + PCA 32 blosc-zstd",
        lambda lv: dict(quant="int8", quant_bits=6, project=_pca(lv, 32), codec="blosc-zstd"),
    ),
    (
        "int8 + PCA 32 + finest box-masked",
        lambda lv: dict(quant="int8", project=_pca(lv, 32), box_mask=_fine(lv)),
    ),
]
QUICK = {
    "float16 zstd",
    "bfloat16 zstd",
    "float16 BitRound5 zstd",
    "int8 zstd",
    "int8-calib zstd",
    "PCA 1/4 (>=64 ch) f16 zstd",
    "finest box-masked f16 zstd",
    "int8 + PCA 32 zstd",
}
FIRST_LEVER = [name for name, _ in OPTIONS].index("int8 zstd")
LEVERS = {name for name, _ in OPTIONS[FIRST_LEVER:]} | {
    "float16 zstd",
    "bfloat16 zstd",
    "bfloat16 blosc-zstd (default codec)",
    "float16 BitRound5 zstd",
    "bfloat16 BitRound5 zstd",
}


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


def _errors(cache, truth) -> tuple[float, float, str]:
    """(max rel err, worst rel RMS, its array) of the decoded records vs the float32 source: projected
    levels are mapped back through their basis (x_hat = mu + B y); box-masked levels are compared inside
    their kept region only (outside is zero by design)."""
    from mfdetr.cache.storage import box_region

    codec = cache.storage_codec
    err2: dict[str, float] = {}
    ref2: dict[str, float] = {}
    maxrel = 0.0
    for j, o in enumerate(truth):
        r = cache[j]
        k = min(o.queries.shape[0], r["queries"].shape[0])
        pairs = []
        for nm in r["features"]:
            got, ref = r["features"][nm].double(), o.features[nm].double()
            lc = codec.levels[nm]
            if lc.basis is not None:
                c, h, w = got.shape
                got = (
                    torch.from_numpy(lc.basis).double() @ got.reshape(c, -1)
                    + torch.from_numpy(lc.mean).double()[:, None]
                ).reshape(-1, h, w)
            if lc.box_mask:
                n = int(r["num_boxes"])
                reg = box_region(
                    r["boxes"].numpy(), n, r["scale"], lc.stride, tuple(got.shape[1:]), codec.margin
                )
                got, ref = got[:, reg], ref[:, reg]
            pairs.append((nm, got, ref))
        pairs.append(("queries", r["queries"][:k].double(), o.queries[:k].double()))
        for nm, got, ref in pairs:
            d = got - ref
            err2[nm] = err2.get(nm, 0.0) + float((d * d).sum())
            ref2[nm] = ref2.get(nm, 0.0) + float((ref**2).sum())
            if d.numel():
                maxrel = max(maxrel, float(d.abs().max()) / max(float(ref.abs().max()), 1e-38))
    rel = {nm: float(np.sqrt(err2[nm] / max(ref2[nm], 1e-300))) for nm in err2}
    worst = max(rel, key=rel.get)
    return maxrel, rel[worst], worst


def _read_rate(cache, min_s: float = 0.5) -> float:
    """Records decoded per second by this process on one thread (one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_s or n < len(cache):
            cache[n % len(cache)]
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def run_detector(name: str, det, images_dir: Path, ann: Path, work: Path, options) -> list[dict]:
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
    for label, make in options:
        out = work / f"storage_{abs(hash(label))}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        kw = {"dtype": "float16", "codec": "zstd", **make(det.levels)}
        if (kw.get("quant") or kw.get("project")) and "keepbits" not in kw:
            kw["dtype"] = "bfloat16"  # decoded int8 / projected values keep float32's range (see notes)
        opts = ExtractOptions(calib_images=min(16, n), **kw)
        res = extract(
            rep, images_dir, ann, out=str(out), opts=opts, batch_size=2, workers=0, progress=False, force=True
        )
        info = cache_info(out)
        per = info["bytes_by_array"]
        fq = sum(v for k, v in per.items() if k.startswith(("feat/", "qparams/")) or k == "queries")
        cache = CacheDataset(out, load_targets=False)
        maxrel, rel, worst = _errors(cache, truth)
        src = {
            **info["detector"],
            "levels": [
                {**lv, "channels": lv.get("source_channels", lv["channels"])} for lv in info["levels"]
            ],
        }  # the detector's own widths
        raw = raw_float32_bytes({**info, "detector": src}, np.asarray(cache._get_group()["feat_size"][:]))
        row = {
            "detector": name,
            "storage": label,
            "options": {k: v for k, v in kw.items()},
            "bytes_per_image": info["bytes_per_image"],
            "feat_q_bytes_per_image": fq / n,
            "ratio": fq / n / raw,
            "max_rel_err": maxrel,
            "rel_rms_err": rel,
            "worst_array": worst,
            "write_ms_per_image": 1e3 * res.timings["write"] / n,
            "read_images_per_s_core": _read_rate(cache),
            "coco_train2017_gb": info["bytes_per_image"] * COCO_TRAIN2017 / 1e9,
            "f16_warning": bool(res.warnings),
            "images": n,
        }
        rows.append(row)
        print(_fmt(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(
        f"({name}: {n} images, detector forward {fwd:.1f}s, raw float32 features+queries "
        f"{raw / 1e3:,.1f} kB/image)",
        flush=True,
    )
    return rows


HEADER = (
    "| detector | storage | bytes/image | feat+q bytes/image | ratio to raw f32 | max rel err "
    "| rel RMS err (worst array) | write ms/img | read img/s/core | COCO train2017 |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(r: dict) -> str:
    note = f" ({r['worst_array']})" if r["rel_rms_err"] > 0 else ""
    return (
        f"| {r['detector']} | {r['storage']} | {r['bytes_per_image'] / 1e3:,.1f} kB | "
        f"{r['feat_q_bytes_per_image'] / 1e3:,.1f} kB | {r['ratio']:.3f} | {r['max_rel_err']:.2e} | "
        f"{r['rel_rms_err']:.2e}{note} | {r['write_ms_per_image']:.1f} | {r['read_images_per_s_core']:.1f} | "
        f"{r['coco_train2017_gb']:,.1f} GB |" + (" f16 warning" if r["f16_warning"] else "")
    )


def dino_detector(categories, topk: int = 100, workdir: Path | None = None):
    """(detector, description): a DINO-style Deformable DETR (two-stage, box refinement, 900 queries, 4
    levels) with a ResNet-50 backbone, random weights, 800x1333 input: transformers configs, no download."""
    import transformers as t

    from mfdetr.detectors.registry import build_detector

    id2label = {i: c["name"] for i, c in enumerate(categories)}
    folder = Path(workdir or tempfile.mkdtemp()) / "dino_r50_random"
    if not (folder / "config.json").exists():
        bb = t.ResNetConfig(
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            layer_type="bottleneck",
            out_features=["stage2", "stage3", "stage4"],
        )
        cfg = two_stage_deformable_config(bb, id2label, num_queries=900)
        torch.manual_seed(0)
        t.DeformableDetrForObjectDetection(cfg).save_pretrained(folder)
        t.DeformableDetrImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}).save_pretrained(
            folder
        )
    det = build_detector(f"hf:{folder}", categories=categories, topk=topk)
    return det, "DINO-style Deformable DETR R50 (two-stage, box refine, 900 queries; random init), 800x1333"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer options and images, shapes only")
    ap.add_argument(
        "--levers", action="store_true", help="only the storage-lever rows (and their references)"
    )
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--r50-images", type=int, default=2)
    ap.add_argument("--dino-images", type=int, default=1)
    ap.add_argument("--no-r50", action="store_true")
    ap.add_argument("--no-shapes", action="store_true")
    ap.add_argument("--no-refs", action="store_true", help="only the storage-lever rows")
    ap.add_argument("--no-dino", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list to this file")
    add_workdir_detector_options(ap)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mfdetr_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    options = [
        o for o in OPTIONS if (not args.quick or o[0] in QUICK) and (not args.levers or o[0] in LEVERS)
    ]
    if args.no_refs:
        options = [o for o in options if o in OPTIONS[FIRST_LEVER:]]
    cats = [{"id": i + 1, "name": nm} for i, nm in enumerate(CATEGORY_NAMES)]
    print(HEADER)
    n = 6 if args.quick else args.images
    rows: list[dict] = []
    if not args.no_shapes:
        images_dir, ann = synth_data(work / f"synth{n}", n)
        det, desc = shapes_detector(cats, workdir=work, spec=args.detector)
        rows = run_detector("shapes 192px", det, images_dir, ann, work, options)
        print(f"shapes detector: {desc}; levels {[(lv.name, lv.stride, lv.channels) for lv in det.levels]}")
    if not args.quick and not args.no_r50:
        det50, desc50 = r50_detector(cats, workdir=work)
        images50, ann50 = synth_data(work / f"synth640_{args.r50_images}", args.r50_images, size=640, seed=12)
        rows += run_detector("RT-DETR R50 640px", det50, images50, ann50, work, options)
        print(f"R50 detector: {desc50}; levels {[(lv.name, lv.stride, lv.channels) for lv in det50.levels]}")
    if not args.quick and not args.no_dino:
        detd, descd = dino_detector(cats, workdir=work)
        imagesd, annd = synth_data(work / f"synth800_{args.dino_images}", args.dino_images, size=800, seed=13)
        rows += run_detector("DINO-style R50 800x1333", detd, imagesd, annd, work, options)
        print(f"DINO-style detector: {descd}; levels {[(v.name, v.stride, v.channels) for v in detd.levels]}")
    print()
    print(HEADER)
    print("\n".join(_fmt(r) for r in rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
