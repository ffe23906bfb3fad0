"""``mfdetr extract``: stage one, the frozen detector once per image into a Zarr cache."""

from __future__ import annotations

from pathlib import Path

import typer

from mfdetr.cli.app import app
from mfdetr.cli.options import comma_list, echo_warnings


@app.command("extract")
def extract_cmd(
    detector: str = typer.Option(
        ...,
        "--detector",
        help="Detector spec: 'shapes' (shipped), 'hf:PATH' (a Hugging Face "
        "checkpoint folder) or 'py:module:function' (a factory returning a FrozenDetector).",
    ),
    images: Path = typer.Option(
        ..., "--images", help="Image root; the JSON's file_name values are relative to it."
    ),
    annotations: Path = typer.Option(
        ..., "--annotations", help="COCO instances JSON (needed for the mask targets)."
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        help="Store path or fsspec URL to write. Default: a store named "
        "by its fingerprint under --cache-root.",
    ),
    cache_root: str | None = typer.Option(
        None,
        "--cache-root",
        help="Directory (or URL) holding stores named "
        "<detector>-<dataset>-<fingerprint>.zarr; an identical earlier "
        "extraction is found and reused. Default: ./cache.",
    ),
    topk: int = typer.Option(100, "--topk", help="Boxes kept per image (top-k by score)."),
    levels: str | None = typer.Option(
        None,
        "--levels",
        help="Comma-separated feature level names to store (default: the detector's default levels).",
    ),
    dtype: str = typer.Option(
        "float16", "--dtype", help="Storage dtype of features and queries: float16, bfloat16 or float32."
    ),
    codec: str = typer.Option(
        "blosc-zstd",
        "--codec",
        help="Compressor: blosc-zstd (Blosc zstd, byte shuffle; as small as zstd 3 at half its CPU), "
        "zstd, lz4 (Blosc, byte shuffle) or none.",
    ),
    codec_level: int | None = typer.Option(
        None, "--codec-level", help="Compression level (default: blosc-zstd 1, zstd 3, lz4 5)."
    ),
    keepbits: int | None = typer.Option(
        None,
        "--keepbits",
        help="Lossy: BitRound mantissa bits kept in features "
        "and queries (<= 10 float16, <= 7 bfloat16). Default: lossless.",
    ),
    mask_size: int = typer.Option(64, "--mask-size", help="Side of the stored mask targets (multiple of 8)."),
    match: str = typer.Option(
        "iou",
        "--match",
        help="Matching rule: 'iou' (each box -> the best non-crowd GT with "
        "IoU >= threshold; one-to-many, default) or 'hungarian' (DETR one-to-one).",
    ),
    iou_threshold: float = typer.Option(0.5, "--iou-threshold", help="Minimum box IoU of a match."),
    block: int | None = typer.Option(
        None,
        "--block",
        help="Images per Zarr shard; the unit of work, resume and "
        "ownership. Default: auto, ~32 MB of features per shard, 8 to 64 images.",
    ),
    quant: str | None = typer.Option(
        None,
        "--quant",
        help="Lossy: affine quantization of the feature maps to "
        "uint8: 'int8' (scale + offset per image and channel) or 'int8-calib' "
        "(per channel, calibrated once on --calib-images images).",
    ),
    quant_bits: int = typer.Option(
        8, "--quant-bits", help="Bits of --quant codes (2..8; fewer compress smaller)."
    ),
    project: str | None = typer.Option(
        None,
        "--project",
        help="Lossy: PCA-project levels to fewer channels, "
        "e.g. 'b4=32,e8=64' (fitted on --calib-images images; the mask network "
        "takes the projected width).",
    ),
    box_mask: str | None = typer.Option(
        None,
        "--box-mask",
        help="Comma-separated levels kept only inside the "
        "union of the kept boxes (+ --box-margin cells); zeros elsewhere.",
    ),
    box_margin: int = typer.Option(2, "--box-margin", help="Cells added around each box for --box-mask."),
    calib_images: int = typer.Option(16, "--calib-images", help="Images fitting --project / int8-calib."),
    calib_from: str | None = typer.Option(
        None,
        "--calib-from",
        help="A cache of the same detector and storage options whose --project bases and int8-calib "
        "ranges to adopt instead of fitting new ones: extract a val or test split with its train cache "
        "here, so that one mask network reads both.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Extract even when the estimated cache size exceeds the target disk's free space.",
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per detector forward."),
    device: str = typer.Option(
        "cpu", "--device", help="Torch device for the detector (cpu, cuda, cuda:1, ...)."
    ),
    workers: int = typer.Option(
        2, "--workers", help="DataLoader worker processes decoding images (0 = in process)."
    ),
    writers: int | None = typer.Option(
        None,
        "--writers",
        help="Writer processes doing matching, conversion, compression and writes (0 = a thread of this "
        "process; default: half the cores the --workers leave, 1 to 8).",
    ),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="i/n: this job writes only blocks b with b % n == i (independent batch jobs filling one cache).",
    ),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        help="Skip unreadable or inconsistent images (listed at the "
        "end) instead of stopping at the first one.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Check every done block against its integrity manifest "
        "(reads the whole cache: crc32c of every object), rewrite damaged metadata, and "
        "re-extract the damaged or missing blocks. A plain rerun checks presence and "
        "sizes only.",
    ),
) -> None:
    """Run the frozen detector once per image and write (or resume, or reuse) a Zarr cache.

    Resumes by default: blocks already done are skipped. Under `torchrun --nproc-per-node N -m mfdetr
    extract ...` each rank writes its own blocks.
    """
    from mfdetr.cache.storage import parse_project
    from mfdetr.extract.loop import ExtractOptions, MatchOptions, extract, parse_shard

    opts = ExtractOptions(
        topk=topk,
        levels=comma_list(levels),
        dtype=dtype,  # type: ignore[arg-type]
        codec=codec,  # type: ignore[arg-type]
        codec_level=codec_level,
        keepbits=keepbits,
        mask_size=mask_size,
        match=MatchOptions(rule=match, iou_threshold=iou_threshold),  # type: ignore[arg-type]
        block=block,
        quant=quant,  # type: ignore[arg-type]
        quant_bits=quant_bits,
        project=parse_project(project),
        box_mask=comma_list(box_mask),
        box_margin=box_margin,
        calib_images=calib_images,
    )
    root = Path(cache_root) if cache_root and "://" not in cache_root else cache_root
    res = extract(
        detector,
        images,
        annotations,
        out=out,
        cache_root=root,
        opts=opts,
        device=device,
        batch_size=batch_size,
        workers=workers,
        writers=writers,
        shard=parse_shard(shard),
        skip_bad=skip_bad,
        progress=not no_progress,
        repair=repair,
        force=force,
        calib_from=calib_from,
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
