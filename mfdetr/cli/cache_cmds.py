"""``mfdetr cache info PATH`` and ``mfdetr cache verify PATH``."""

from __future__ import annotations

import json

import typer

from mfdetr.cli.app import cache_app
from mfdetr.cli.options import StorePath


def _mb(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:.3f} MB"


@cache_app.command("info")
def info_cmd(
    path: StorePath,
    as_json: bool = typer.Option(False, "--json", help="Print the full info as JSON."),
) -> None:
    """Images done/total, bytes on disk and per image, ratio to raw float32, detector, dataset, options."""
    from mfdetr.cache.inspect import cache_info

    info = cache_info(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    o = info["options"]
    lines = [
        f"cache        {info['path']}",
        f"fingerprint  {info['fingerprint']}",
        f"images       {info['images_done']}/{info['images_total']} done"
        + (f" ({info['images_bad']} skipped as bad)" if info["images_bad"] else ""),
        f"on disk      {_mb(info['bytes_on_disk'])}, {_mb(info['bytes_per_image'])} per image; raw float32 "
        f"{_mb(info['raw_float32_per_image'])} per image"
        + (f" (ratio {info['ratio_to_raw_float32']:.3f})" if info["ratio_to_raw_float32"] else ""),
        f"whole set    {info['estimated_bytes_total']['images']} images: "
        + (
            f"{info['estimated_bytes_total']['measured'] / 1e9:.3f} GB at the measured size per image, "
            if info["estimated_bytes_total"]["measured"]
            else ""
        )
        + f"{info['estimated_bytes_total']['schema'] / 1e9:.3f} GB estimated from the schema",
        f"detector     {info['detector']['spec']} (fp {info['detector']['fingerprint'][:12]}, "
        f"query_dim {info['detector']['query_dim']})",
        f"dataset      {info['dataset']['annotations']} ({info['dataset']['num_images']} images, "
        f"fp {info['dataset']['fingerprint'][:12]})",
        "levels       "
        + ", ".join(
            f"{lv['name']} (stride {lv['stride']}, {lv['channels']} ch, padded {info['padded'][lv['name']][0]}x"
            f"{info['padded'][lv['name']][1]})"
            for lv in info["levels"]
        ),
        f"options      topk {o['topk']}, dtype {o['dtype']}, codec {o['codec']}"
        + (f" level {o['codec_level']}" if o.get("codec_level") is not None else "")
        + (f", keepbits {o['keepbits']}" if o.get("keepbits") is not None else ", lossless")
        + f", mask {o['mask_size']}x{o['mask_size']}, match {o['match']['rule']} IoU>={o['match']['iou_threshold']}"
        + f", block {o['block']}",
    ]
    if info["bytes_by_array"]:
        parts = sorted(info["bytes_by_array"].items(), key=lambda kv: -kv[1])
        lines.append("by array     " + ", ".join(f"{k} {_mb(v)}" for k, v in parts if v > 0))
    typer.echo("\n".join(lines))


@cache_app.command("verify")
def verify_cmd(
    path: StorePath,
    max_images: int | None = typer.Option(None, "--max-images", help="Decode only the first N done images."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Presence and sizes of every stored object against the "
        "integrity manifest only (no reading of the data).",
    ),
) -> None:
    """Check a cache: metadata, every done block against its integrity manifest, and (default) that every
    done image decodes and is sane; a partial store is a problem too. Exit 1 on any problem."""
    from mfdetr.cache.inspect import verify_report

    rep = verify_report(path, quick=quick, max_images=max_images)
    done = f"{rep.images_done} of {rep.images_total} images done" + (
        f" ({rep.images_bad} skipped as bad)" if rep.images_bad else ""
    )
    if rep.problems:
        for p in rep.problems[:200]:
            typer.echo(f"problem: {p}")
        if len(rep.problems) > 200:
            typer.echo(f"... and {len(rep.problems) - 200} more")
        typer.echo(
            f"{len(rep.problems)} problem(s) in {path}; {done}. Repair: rerun the `mfdetr extract` that "
            "wrote it with --repair (re-extracts only the damaged blocks)"
        )
        raise typer.Exit(1)
    typer.echo(f"ok: {path}: {done}" + (" (quick: presence and sizes only)" if quick else ""))
