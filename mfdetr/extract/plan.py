"""Planning of an ``extract`` run: the result record, ``--shard`` parsing, the store location, the
torchrun ranks, the cache metadata and fingerprint (``build_meta``) and the batches of the pending blocks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfdetr import __version__
from mfdetr.cache.fingerprint import cache_fingerprint, store_name
from mfdetr.cache.schema import SCHEMA_VERSION, ExtractOptions, auto_block, padded_sizes
from mfdetr.cache.writer import BlockWriter, is_url
from mfdetr.errors import MfdetrError

DEFAULT_CACHE_ROOT = Path("cache")


@dataclass
class ExtractResult:
    """What ``extract`` did.

    path: the store (local path or URL); fingerprint: the cache fingerprint;
    num_images: images in the dataset; images_done: done images in the store after this run;
    images_bad: of those, images skipped as bad (this run or an earlier one);
    images_written: images this process extracted now (0 when reused);
    reused: True when this process found all its blocks already done and did nothing;
    bad: (image_id, reason) of images skipped by this process (skip_bad);
    warnings: storage warnings of this run (e.g. a level whose values underflow float16);
    timings: seconds: total, setup, detect (detector forward), load_wait (waiting for decoded
        images), write (writers busy, summed), write_cpu (their CPU seconds; writer processes only),
        put_wait (detector waiting for the writers), final_write_wait (writers finishing after the
        last forward), and images_per_s.
    """

    path: str
    fingerprint: str
    num_images: int
    images_done: int
    images_bad: int
    images_written: int
    reused: bool
    bad: list[tuple[int, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    warnings: list[str] = field(default_factory=list)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None passes through."""
    if text is None or text == "":
        return None
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise MfdetrError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise MfdetrError(f"--shard {text}: need 0 <= i < n")
    return i, n


def resolve_store_path(detector_spec: str, annotations: Path, fingerprint: str, out: str | None,
                       cache_root: Path | str | None) -> str:
    """The store location: ``out`` as given, else ``<cache_root>/<detector>-<dataset>-<fp12>.zarr``."""
    if out is not None and cache_root is not None:
        raise MfdetrError("give either --out or --cache-root, not both")
    if out is not None:
        return str(out)
    root = str(cache_root) if cache_root is not None else str(DEFAULT_CACHE_ROOT)
    name = store_name(detector_spec, annotations, fingerprint)
    if is_url(root):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


# ---------------------------------------------------------------------------------------------
# run set-up


def dist_info() -> tuple[int, int, bool, bool]:
    """(rank, world, uses torch.distributed, we initialised it) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, False, False
    import torch.distributed as dist

    mine = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise MfdetrError("WORLD_SIZE > 1 but no MASTER_ADDR: run under torchrun, or use --shard i/n")
        dist.init_process_group("gloo")
        mine = True
    return dist.get_rank(), dist.get_world_size(), True, mine


def _image_hw(dataset: Any, i: int) -> tuple[int, int]:
    info = dataset.image_info(i)
    if not isinstance(info, dict):
        info = vars(info)
    return int(info["height"]), int(info["width"])


def make_batches(writer: BlockWriter, blocks: list[int], batch_size: int) -> list[list[int]]:
    out = []
    for b in blocks:
        s, e = writer.block_range(b)
        for k in range(s, e, batch_size):
            out.append(list(range(k, min(e, k + batch_size))))
    return out


def detector_for(spec: str, dataset: Any, opts: ExtractOptions, device: str):
    from mfdetr.detectors.registry import build_detector

    return build_detector(spec, categories=dataset.categories, device=device, levels=opts.levels, topk=opts.topk)


def build_meta(detector: Any, dataset: Any, images: Path, annotations: Path, opts: ExtractOptions) -> dict[str, Any]:
    """The group metadata (``mfdetr`` attribute) for this detector x dataset x options."""
    levels = [{"name": lv.name, "stride": int(lv.stride), "channels": int(lv.channels)} for lv in detector.levels]
    if opts.levels is not None and [lv["name"] for lv in levels] != list(opts.levels):
        got = [lv["name"] for lv in levels]
        if sorted(got) != sorted(opts.levels):
            raise MfdetrError(f"asked for levels {opts.levels} but the detector gives {got}")
    n = len(dataset.image_ids)
    input_sizes = [tuple(detector.input_size(_image_hw(dataset, i))) for i in range(n)]
    padded = padded_sizes(input_sizes, levels)
    options = opts.to_attrs()
    if options["block"] is None:
        options["block"] = auto_block(levels, padded, opts.topk, int(detector.query_dim), opts.dtype)
    fp = cache_fingerprint(detector.fingerprint, dataset.fingerprint, options)
    return {
        "schema_version": SCHEMA_VERSION,
        "mfdetr_version": __version__,
        "fingerprint": fp,
        "detector": {"spec": detector.spec, "fingerprint": detector.fingerprint, "query_dim": int(detector.query_dim),
                     "levels": levels},
        "dataset": {
            "annotations": str(Path(annotations).resolve()),
            "images": str(Path(images).resolve()),
            "fingerprint": dataset.fingerprint,
            "num_images": n,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in dataset.categories],
        },
        "options": options,
        "padded": padded,
    }
