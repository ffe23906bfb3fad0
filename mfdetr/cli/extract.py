"""``mfdetr extract``: stage one, the frozen detector once per image into a Zarr cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import FORCE, Opt, comma_list, echo_warnings, pick, with_options

# what to read and where the cache goes
INPUTS = (
    Opt(
        "detector",
        str,
        ...,
        "Detector spec: 'shapes' (shipped), 'hf:PATH' (a Hugging Face checkpoint folder) or "
        "'py:module:function' (a factory returning a FrozenDetector).",
    ),
    Opt("images", Path, ..., "Image root; the JSON's file_name values are relative to it."),
    Opt("annotations", Path, ..., "COCO instances JSON (needed for the mask targets)."),
    Opt(
        "out",
        str | None,
        None,
        "Store path or fsspec URL to write. Default: a store named by its fingerprint under --cache-root.",
    ),
    Opt(
        "cache_root",
        str | None,
        None,
        "Directory (or URL) holding stores named <detector>-<dataset>-<fingerprint>.zarr; an identical "
        "earlier extraction is found and reused. Default: ./cache.",
    ),
)
# what the cache stores: the fields of ExtractOptions (match + iou_threshold make its MatchOptions)
STORAGE = (
    Opt("topk", int, 100, "Boxes kept per image (top-k by score)."),
    Opt(
        "levels",
        str | None,
        None,
        "Comma-separated feature level names to store (default: the detector's default levels). A name "
        "pxN adds the network-input RGB at stride N, for the mask network's pixel refinement "
        "(e.g. b4,e8,e16,e32,px1; at COCO resolution px2 or px4 keep it small).",
    ),
    Opt("dtype", str, "float16", "Storage dtype of features and queries: float16, bfloat16 or float32."),
    Opt(
        "codec",
        str,
        "blosc-zstd",
        "Compressor: blosc-zstd (Blosc zstd, byte shuffle; as small as zstd 3 at half its CPU), "
        "zstd, lz4 (Blosc, byte shuffle) or none.",
    ),
    Opt("codec_level", int | None, None, "Compression level (default: blosc-zstd 1, zstd 3, lz4 5)."),
    Opt(
        "keepbits",
        int | None,
        None,
        "Lossy: BitRound mantissa bits kept in features and queries (<= 10 float16, <= 7 bfloat16). "
        "Default: lossless.",
    ),
    Opt("mask_size", int, 64, "Side of the stored mask targets (multiple of 8)."),
    Opt(
        "match",
        str,
        "iou",
        "Matching rule: 'iou' (each box -> the best non-crowd GT with IoU >= threshold; one-to-many, "
        "default) or 'hungarian' (DETR one-to-one).",
    ),
    Opt("iou_threshold", float, 0.5, "Minimum box IoU of a match."),
    Opt(
        "block",
        int | None,
        None,
        "Images per Zarr shard; the unit of work, resume and ownership. Default: auto, ~32 MB of "
        "features per shard, 8 to 64 images.",
    ),
    Opt(
        "quant",
        str | None,
        None,
        "Lossy: affine quantization of the feature maps to uint8: 'int8' (scale + offset per image and "
        "channel) or 'int8-calib' (per channel, calibrated once on --calib-images images).",
    ),
    Opt("quant_bits", int, 8, "Bits of --quant codes (2..8; fewer compress smaller)."),
    Opt(
        "project",
        str | None,
        None,
        "Lossy: PCA-project levels to fewer channels, e.g. 'b4=32,e8=64' (fitted on --calib-images "
        "images; the mask network takes the projected width).",
    ),
    Opt(
        "box_mask",
        str | None,
        None,
        "Comma-separated levels kept only inside the union of the kept boxes (+ --box-margin cells); "
        "zeros elsewhere.",
    ),
    Opt("box_margin", int, 2, "Cells added around each box for --box-mask."),
    Opt("calib_images", int, 16, "Images fitting --project / int8-calib."),
)
# how this run goes: the keyword arguments of mfdetr.extract.loop.extract (shard and progress parsed)
RUN = (
    Opt(
        "calib_from",
        str | None,
        None,
        "A cache of the same detector and storage options whose --project bases and int8-calib ranges "
        "to adopt instead of fitting new ones: extract a val or test split with its train cache here, "
        "so that one mask network reads both.",
    ),
    FORCE,
    Opt("batch_size", int, 4, "Images per detector forward."),
    Opt("device", str, "cpu", "Torch device for the detector (cpu, cuda, cuda:1, ...)."),
    Opt("workers", int, 2, "DataLoader worker processes decoding images (0 = in process)."),
    Opt(
        "writers",
        int | None,
        None,
        "Writer processes doing matching, conversion, compression and writes (0 = a thread of this "
        "process; default: half the cores the --workers leave, 1 to 8).",
    ),
    Opt(
        "shard",
        str | None,
        None,
        "i/n: this job writes only blocks b with b % n == i (independent batch jobs filling one cache).",
    ),
    Opt(
        "skip_bad",
        bool,
        False,
        "Skip unreadable or inconsistent images (listed at the end) instead of stopping at the first one.",
    ),
    Opt("no_progress", bool, False, "No progress bar."),
    Opt(
        "repair",
        bool,
        False,
        "Check every done block against its integrity manifest (reads the whole cache: crc32c of every "
        "object), rewrite damaged metadata, and re-extract the damaged or missing blocks. A plain rerun "
        "checks presence and sizes only.",
    ),
)


@app.command("extract")
@with_options(INPUTS, STORAGE, RUN)
def extract_cmd(**kw: Any) -> None:
    """Run the frozen detector once per image and write (or resume, or reuse) a Zarr cache.

    Resumes by default: blocks already done are skipped. Under `torchrun --nproc-per-node N -m mfdetr
    extract ...` each rank writes its own blocks.
    """
    from mfdetr.cache.storage import parse_project
    from mfdetr.extract.loop import ExtractOptions, MatchOptions, extract, parse_shard

    storage = pick(kw, STORAGE)
    match = MatchOptions(rule=storage.pop("match"), iou_threshold=storage.pop("iou_threshold"))
    storage.update(
        match=match,
        levels=comma_list(storage["levels"]),
        project=parse_project(storage["project"]),
        box_mask=comma_list(storage["box_mask"]),
    )
    run = pick(kw, RUN)
    shard = run["shard"]
    run.update(shard=parse_shard(shard), progress=not run.pop("no_progress"))
    cache_root = kw["cache_root"]
    root = Path(cache_root) if cache_root and "://" not in cache_root else cache_root
    opts = ExtractOptions(**storage)
    res = extract(
        kw["detector"], kw["images"], kw["annotations"], out=kw["out"], cache_root=root, opts=opts, **run
    )
    for f in res.repaired_files:
        typer.echo(f"repaired metadata file {f}")
    if res.repaired:
        typer.echo(f"re-extracted {len(res.repaired)} damaged or missing block(s): {res.repaired}")
    echo_warnings(res.warnings)
    if res.rank != 0:
        return
    who = f" (shard {shard})" if shard else (f" (rank 0 of {res.world})" if res.world > 1 else "")
    if res.reused:
        typer.echo(
            f"cache {res.path} already holds these images{who}: nothing to do "
            f"({res.images_done}/{res.num_images} done, fingerprint {res.fingerprint[:12]})"
        )
    else:
        t = res.timings
        typer.echo(
            f"wrote {res.images_written} images to {res.path}{who} in {t['total']:.1f}s "
            f"({res.images_written / max(t['total'], 1e-9):.2f} img/s; detector {t['detect']:.1f}s, "
            f"writer {t['write']:.1f}s); {res.images_done}/{res.num_images} done, fingerprint {res.fingerprint[:12]}"
        )
    if res.bad:
        typer.echo(f"skipped {len(res.bad)} bad image(s):")
        for iid, reason in res.bad:
            typer.echo(f"  image id {iid}: {reason}")
    elif res.images_bad:
        typer.echo(f"({res.images_bad} image(s) were skipped as bad by an earlier run)")
