"""Planning of an ``extract`` run: the result record, ``--shard`` parsing, the store location, the
torchrun ranks, the cache metadata and fingerprint (``build_meta``) and the batches of the pending blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfdetr import __version__
from mfdetr.cache.fingerprint import cache_fingerprint, store_name
from mfdetr.cache.schema import SCHEMA_VERSION, ExtractOptions, auto_block, padded_sizes
from mfdetr.cache.writer import BlockWriter, is_url
from mfdetr.data.annotations import describe_degenerate
from mfdetr.detectors.base import level_dicts
from mfdetr.errors import MfdetrError
from mfdetr.utils.distributed import torchrun_env
from mfdetr.utils.fs import disk_full_error, ensure_writable_dir

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
    repaired / repaired_files: blocks found damaged or missing (integrity manifest) and re-extracted,
        and metadata files rewritten (see ``mfdetr.cache.integrity``);
    timings: seconds: total, setup, detect (detector forward), load_wait (waiting for decoded
        images), write (writers busy, summed), write_cpu (their CPU seconds; writer processes only),
        writer_start_cpu (the writer processes' start-up CPU seconds, summed: store open, imports),
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
    repaired: list[int] = field(default_factory=list)  # damaged / missing blocks found and re-extracted
    repaired_files: list[str] = field(default_factory=list)  # metadata files rewritten from zarr.json


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


def resolve_store_path(
    detector_spec: str, annotations: Path, fingerprint: str, out: str | None, cache_root: Path | str | None
) -> str:
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
    env = torchrun_env()
    if not env.launched:
        return 0, 1, False, False
    import torch.distributed as dist

    mine = False
    if not dist.is_initialized():
        if env.master_addr is None:
            raise MfdetrError("WORLD_SIZE > 1 but no MASTER_ADDR: run under torchrun, or use --shard i/n")
        dist.init_process_group("gloo")
        mine = True
    return dist.get_rank(), dist.get_world_size(), True, mine


def _image_hw(dataset: Any, i: int) -> tuple[int, int]:
    info = dataset.image_info(i)
    if not isinstance(info, dict):
        info = vars(info)
    return int(info["height"]), int(info["width"])


def dataset_input_sizes(detector: Any, dataset: Any) -> list[tuple[int, int]]:
    """The detector's network input size of every image (from the annotation's height / width)."""
    return [tuple(detector.input_size(_image_hw(dataset, i))) for i in range(len(dataset.image_ids))]


def make_batches(writer: BlockWriter, blocks: list[int], batch_size: int) -> list[list[int]]:
    out = []
    for b in blocks:
        s, e = writer.block_range(b)
        for k in range(s, e, batch_size):
            out.append(list(range(k, min(e, k + batch_size))))
    return out


def detector_for(spec: str, dataset: Any, opts: ExtractOptions, device: str):
    from mfdetr.detectors.registry import build_detector

    return build_detector(
        spec, categories=dataset.categories, device=device, levels=opts.levels, topk=opts.topk
    )


def _project_levels(levels: list[dict[str, Any]], opts: ExtractOptions) -> None:
    """Check the storage levers' level names; a projected level stores (and reports) its new width."""
    names = [lv["name"] for lv in levels]
    for key, chosen in (("project", list(opts.project or {})), ("box_mask", opts.box_mask or [])):
        bad = [c for c in chosen if c not in names]
        if bad:
            raise MfdetrError(f"extract option {key} names level(s) {bad}; the stored levels are {names}")
    for lv in levels:
        width = (opts.project or {}).get(lv["name"])
        if width is not None:
            if width > lv["channels"]:
                raise MfdetrError(
                    f"project.{lv['name']} = {width} exceeds the level's {lv['channels']} channels"
                )
            lv["source_channels"], lv["channels"] = lv["channels"], int(width)


def calibration_samples(detector: Any, dataset: Any, n: int, topk: int) -> list[dict[str, Any]]:
    """Detector outputs of the first ``n`` readable images, one forward each (independent of the batch
    size), as ``mfdetr.cache.storage.calibrate`` takes them."""
    out: list[dict[str, Any]] = []
    for i in range(len(dataset.image_ids)):
        if len(out) >= n:
            break
        sample = dataset[i]
        if sample is None:  # skipped as bad (skip_bad)
            continue
        o = detector.detect([sample.image.to(detector.device)])[0].to("cpu")
        k = min(int(o.boxes.shape[0]), int(topk))  # the boxes the sink keeps
        out.append(
            {
                "features": {name: f.float() for name, f in o.features.items()},
                "boxes": o.boxes[:k].float().numpy(),
                "n": k,
                "scale": tuple(o.scale),
            }
        )
    return out


def label_map_attr(detector: Any) -> list[list[int]] | None:
    """The detector's ``label_map`` (model label id -> dataset category id) as sorted JSON pairs, or None:
    ``predict`` rebuilds the detector with it (it is part of the detector's fingerprint)."""
    mapping = getattr(detector, "label_map", None)
    return None if mapping is None else sorted([int(k), int(v)] for k, v in dict(mapping).items())


def build_meta(
    detector: Any,
    dataset: Any,
    images: Path,
    annotations: Path,
    opts: ExtractOptions,
    calib_source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The group metadata (``mfdetr`` attribute) for this detector x dataset x options.

    calib_source: ``{path, id}`` of the cache whose storage calibration this one adopts
    (``--calib-from``); its id joins the fingerprint (a self-calibrated cache has other bases)."""
    levels = level_dicts(detector.levels)
    if opts.levels is not None and [lv["name"] for lv in levels] != list(opts.levels):
        got = [lv["name"] for lv in levels]
        if sorted(got) != sorted(opts.levels):
            raise MfdetrError(f"asked for levels {opts.levels} but the detector gives {got}")
    _project_levels(levels, opts)
    n = len(dataset.image_ids)
    input_sizes = dataset_input_sizes(detector, dataset)
    padded = padded_sizes(input_sizes, levels)
    options = opts.to_attrs()
    if options["block"] is None:
        options["block"] = auto_block(
            levels,
            padded,
            opts.topk,
            int(detector.query_dim),
            opts.dtype,
            feat_itemsize=1 if opts.quant else None,
        )
    fp_options = options if calib_source is None else {**options, "calib_from": calib_source["id"]}
    fp = cache_fingerprint(detector.fingerprint, dataset.fingerprint, fp_options)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "mfdetr_version": __version__,
        "fingerprint": fp,
        "detector": {
            "spec": detector.spec,
            "fingerprint": detector.fingerprint,
            "query_dim": int(detector.query_dim),
            "levels": levels,
            "label_map": label_map_attr(detector),
        },
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
    if calib_source is not None:
        meta["calib_source"] = dict(calib_source)
    return meta


# ---------------------------------------------------------------------------------------------
# disk budget


def estimate_total_bytes(
    levels: list[dict[str, Any]], input_sizes: list[tuple[int, int]], query_dim: int, options: dict[str, Any]
) -> float:
    """Estimated bytes of a whole cache (``estimate_image_bytes`` summed over the images)."""
    from mfdetr.cache.schema import estimate_image_bytes

    return sum(estimate_image_bytes(levels, hw, query_dim, options)["total"] for hw in input_sizes)


def _lever_candidates(levels: list[dict[str, Any]], options: dict[str, Any]) -> list[tuple[str, dict, list]]:
    """(description, options, stored levels) of ever stronger storage settings to suggest."""
    q8 = {**options, "quant": "int8", "quant_bits": 8}
    quarter = {lv["name"]: max(1, int(lv["channels"]) // 4) for lv in levels if int(lv["channels"]) >= 64}
    plev = [{**lv, "channels": quarter.get(lv["name"], lv["channels"])} for lv in levels]
    proj = ",".join(f"{k}={v}" for k, v in quarter.items())
    out = [
        (
            "--dtype float16 --keepbits 5",
            {**options, "dtype": "float16", "keepbits": 5, "quant": None},
            levels,
        ),
        ("--quant int8", q8, levels),
    ]
    if quarter:
        out.append((f"--quant int8 --project {proj}", q8, plev))
        out.append((f"--quant int8 --quant-bits 6 --project {proj}", {**q8, "quant_bits": 6}, plev))
    return out


def check_disk_space(
    path: str, meta: dict[str, Any], input_sizes: list[tuple[int, int]], force: bool
) -> float:
    """Refuse (MfdetrError) an extract whose estimated size exceeds the free space of the target disk,
    naming the numbers and a storage lever that would fit; returns the estimate (bytes). Local stores
    only; ``force`` skips the refusal."""
    import shutil

    levels, qd, options = meta["detector"]["levels"], int(meta["detector"]["query_dim"]), meta["options"]
    need = estimate_total_bytes(levels, input_sizes, qd, options)
    if force or is_url(path):
        return need
    target = Path(path)
    have = 0
    if target.exists():  # resuming: what is on disk already counts
        have = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need - have <= free:
        return need
    hint = "no single lever here fits: free space, or store fewer levels (--levels)"
    for desc, opts2, lev2 in _lever_candidates(levels, options):
        est = estimate_total_bytes(lev2, input_sizes, qd, opts2)
        if est - have <= free:
            hint = f"{desc} (estimated {est / 1e9:.1f} GB) would fit"
            break
    raise MfdetrError(
        f"the cache {path} is estimated at {need / 1e9:.1f} GB for {len(input_sizes)} images "
        f"({need / max(1, len(input_sizes)) / 1e6:.2f} MB per image; {have / 1e9:.1f} GB already there) but "
        f"{probe} has {free / 1e9:.1f} GB free: {hint}; or pass --force to extract anyway"
    )


def check_output(out: str | Path | None, cache_root: str | Path | None) -> None:
    """Refuse an unwritable ``--out`` / ``--cache-root`` before any work (URLs are left to their backend)."""
    if out is not None:
        ensure_writable_dir(out, "--out", create=False)
    else:
        root = cache_root if cache_root is not None else DEFAULT_CACHE_ROOT
        ensure_writable_dir(root, "--cache-root", create=False)


def disk_full_during_extract(path: str, need_total: float) -> MfdetrError:
    """The error for a disk that filled while writing the cache: the bytes still needed (the estimate of the
    whole cache minus what the store holds now) and the free bytes."""
    have = 0
    if not is_url(path) and Path(path).exists():
        have = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return disk_full_error(path, max(0, int(need_total - have)), "writing the cache")


def dataset_warnings(dataset: Any, detector: Any) -> list[str]:
    """Warnings about the dataset for this run: the degenerate annotations the reader skipped (by id), and
    the categories no detector class maps to (they never get a box, so never a mask target)."""
    out = []
    if getattr(dataset, "degenerate", None):
        out.append(describe_degenerate(dataset.degenerate))
    label_map = getattr(detector, "label_map", None)
    produced = set(label_map.values()) if label_map else set(getattr(detector, "id2label", None) or {})
    if label_map or produced:  # unknown for a detector without label_map / id2label
        missing = [c for c in dataset.categories if int(c["id"]) not in produced]
        if missing:
            names = ", ".join(f"{c['name']!r} (id {c['id']})" for c in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            out.append(
                f"{len(missing)} of {len(dataset.categories)} dataset categories map to no class of "
                f"the detector {detector.spec}: {names}{more}. They get no boxes and no mask targets; "
                "map them with a label map JSON {model_label_id: dataset_category_id}, or rename them "
                "to the detector's class names."
            )
    return out
