"""Stage one: run the frozen detector once per image and write the Zarr cache.

``extract(...)`` is the Python API behind ``mfdetr extract``. The pipeline:

    DataLoader workers (decode image + GT masks)  ->  main thread: detector.detect(batch)
        -> bounded queues -> writer processes (``writers``; or one thread with writers=0): matching,
                             mask targets, dtype conversion, block buffers, Zarr writes (compression
                             happens here), ``done`` last per block; block b goes to writer b % writers

so the detector forward overlaps decoding, compression and writing, and the writers' Python work
does not contend for the detector process's GIL. Work is split in *blocks*
(``options.block`` images = one Zarr shard): a process owns blocks ``r, r + n, r + 2n, ...``
(``--shard r/n``, or torchrun's RANK/WORLD_SIZE, or both), skips blocks already done (resume) and
writes each block once. Batches never cross a block boundary, so batch composition, hence every
byte, is the same whether a run was interrupted, resumed or split.

Files: this module holds the run (``extract``); ``extract_plan.py`` the set-up (shards, store path,
metadata + fingerprint, pending blocks -> batches), ``extract_source.py`` the DataLoader side,
``extract_sink.py`` the per-image step (matching + mask targets, block buffers, Zarr writes) and
``extract_writers.py`` the writer thread / processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfdetr.cache.floats import float16_warnings
from mfdetr.cache.integrity import repair_scan
from mfdetr.cache.schema import ExtractOptions, MatchOptions
from mfdetr.cache.storage import (
    calibrate,
    calibration_from,
    calibration_id,
    needs_calibration,
    stored_calibration,
)
from mfdetr.cache.writer import BlockWriter, create_or_open, is_url
from mfdetr.errors import MfdetrError
from mfdetr.extract.plan import (
    ExtractResult,
    build_meta,
    calibration_samples,
    check_disk_space,
    check_output,
    dataset_input_sizes,
    dataset_warnings,
    detector_for,
    disk_full_during_extract,
    dist_info,
    make_batches,
    parse_shard,
    resolve_store_path,
)
from mfdetr.extract.source import FATAL, BatchSource, identity
from mfdetr.extract.transfer import HostTransfer
from mfdetr.extract.writers import ProcessWriter, ThreadWriter, default_writers
from mfdetr.utils.device import resolve_device
from mfdetr.utils.fs import is_disk_full
from mfdetr.utils.progress import progress_bar

__all__ = ["ExtractOptions", "MatchOptions", "ExtractResult", "extract", "resolve_store_path", "parse_shard"]


def extract(
    detector_spec: Any,
    images: Path | str,
    annotations: Path | str,
    out: str | None = None,
    cache_root: Path | str | None = None,
    opts: ExtractOptions | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    workers: int = 2,
    writers: int | None = None,
    shard: tuple[int, int] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    repair: bool = False,
    force: bool = False,
    calib_from: str | Path | None = None,
) -> ExtractResult:
    """Run ``detector_spec`` (a spec string, or a FrozenDetector object) over the COCO dataset and
    write (or complete, or reuse) its cache; see the module doc. Resumes by default.

    workers: DataLoader processes decoding images and masks (0 = in this process).
    writers: processes converting, matching, compressing and writing blocks (0 = one thread of
        this process; None = ``default_writers(workers)``, from the CPU count).
    repair: check every done block's objects against its integrity manifest (crc32c: reads the whole
        cache) and rewrite a damaged root zarr.json; a plain run checks presence + sizes only. Damaged
        or missing blocks are re-extracted either way (``ExtractResult.repaired``).
    force: extract even when the estimated cache size exceeds the target disk's free space.
    calib_from: a finished cache of the same detector and storage options whose calibration (PCA
        bases, int8 ranges) this one adopts instead of fitting its own: the val split must read in the
        train split's bases (``mfdetr run`` passes the train cache). Ignored without a calibration.
    """
    import torchvision.ops  # noqa: F401  (slow first import: keep it out of the writer thread)

    from mfdetr.data.coco import CocoDataset

    t_start = time.perf_counter()
    opts = (opts or ExtractOptions()).validate()
    if batch_size < 1:
        raise MfdetrError(f"batch size must be >= 1, got {batch_size}")
    images, annotations = Path(images), Path(annotations)
    device = str(resolve_device(device))
    check_output(out, cache_root)
    dataset = CocoDataset(annotations, images, skip_bad=skip_bad, load_masks=True)
    if isinstance(detector_spec, str):
        detector = detector_for(detector_spec, dataset, opts, device)
        spec = detector_spec
    else:
        detector = detector_spec.to(device)
        spec = detector.spec
    source, adopted = None, None
    if calib_from is not None and needs_calibration(opts.to_attrs()):
        adopted = calibration_from(str(calib_from), detector.fingerprint, opts.to_attrs())
        source = {"path": str(calib_from), "id": calibration_id(adopted)}
    meta = build_meta(detector, dataset, images, annotations, opts, calib_source=source)
    fp = meta["fingerprint"]
    path = resolve_store_path(spec, annotations, fp, out, cache_root)
    if not is_url(path) and cache_root is not None:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
    need = check_disk_space(path, meta, dataset_input_sizes(detector, dataset), force)
    if needs_calibration(meta["options"]):  # projections / int8 ranges: fitted once, then read back
        meta["storage"] = (
            adopted
            or stored_calibration(path, fp)
            or calibrate(
                meta["options"],
                meta["detector"]["levels"],
                calibration_samples(detector, dataset, int(meta["options"]["calib_images"]), opts.topk),
            )
        )

    # who owns which blocks
    rank, world, use_dist, own_pg = dist_info()
    wid, wtotal = rank, world
    if shard is not None:
        si, sn = shard
        wid, wtotal = si * world + rank, sn * world

    # create (rank 0 first under torchrun; every --shard job may create: creation is race-safe)
    if use_dist:
        import torch.distributed as dist

        err = [None]
        if rank == 0:
            try:
                create_or_open(path, meta, create=True, repair=repair)
            except MfdetrError as e:
                err = [str(e)]
        dist.broadcast_object_list(err, src=0)
        if err[0] is not None:
            raise MfdetrError(err[0])
        group = create_or_open(path, meta, create=(rank == 0))
    else:
        group = create_or_open(path, meta, create=True, repair=repair)
    if needs_calibration(meta["options"]):  # a concurrent job may have created it first: use what it stored
        meta["storage"] = stored_calibration(path, fp) or meta["storage"]
    writer = BlockWriter(group, meta)
    owned = list(range(wid, writer.num_blocks, wtotal))
    repaired, repaired_files = repair_scan(group, meta, owned, full=repair)
    writer.clear_blocks(repaired)  # rewritten whole below, as if never written
    pending = writer.pending_blocks(owned)
    t_setup = time.perf_counter() - t_start

    timings = {"setup": t_setup, "detect": 0.0, "load_wait": 0.0, "write": 0.0, "put_wait": 0.0}
    bad: list[tuple[int, str]] = []
    warns: list[str] = []
    written = 0
    if pending:
        batches = make_batches(writer, pending, batch_size)
        n_todo = sum(len(b) for b in batches)
        source = BatchSource(dataset, batches, skip_bad)
        loader = torch.utils.data.DataLoader(
            source,
            batch_size=None,
            shuffle=False,
            num_workers=max(0, int(workers)),
            collate_fn=identity,
            prefetch_factor=2 if workers > 0 else None,
        )
        maxsize = max(2, 2 * int(meta["options"]["block"]))
        writers = default_writers(workers) if writers is None else int(writers)
        transfer = HostTransfer(meta, detector.device)
        # memory:// stores live in this process only: a writer process would write into its own copy
        use_procs = writers > 0 and not str(path).startswith("memory://")
        bg: Any = (
            ProcessWriter(path, meta, int(writers), maxsize)
            if use_procs
            else ThreadWriter(writer, meta, maxsize)
        )
        bar = progress_bar(
            total=n_todo,
            desc=f"extract {Path(str(path)).name}",
            enabled=progress and rank == 0,
            leave=True,
            smoothing=0.1,
        )
        try:
            it = iter(loader)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                timings["load_wait"] += time.perf_counter() - t0
                for _, _, _, reason in batch:
                    if reason is not None and reason.startswith(FATAL):
                        raise MfdetrError(reason[len(FATAL) :])
                good = [(p, iid, pl) for p, iid, pl, _ in batch if pl is not None]
                outs = []
                if good:
                    t0 = time.perf_counter()
                    outs = detector.detect([pl["image"].to(detector.device) for _, _, pl in good])
                    outs = transfer(outs)
                    timings["detect"] += time.perf_counter() - t0
                byp = {p: o for (p, _, _), o in zip(good, outs)}
                for p, iid, pl, reason in batch:
                    if pl is None:
                        bad.append((iid, reason or "bad image"))
                        timings["put_wait"] += bg.put(("bad", p, iid))
                    else:
                        timings["put_wait"] += bg.put(("img", p, iid, byp[p], pl["gt"]))
                bar.update(len(batch))
            t0 = time.perf_counter()
            written, timings["write"], f16_stats, write_cpu = bg.finish()
            transfer.merge_stats_into(f16_stats)
            if write_cpu is not None:
                timings["write_cpu"] = write_cpu
            if bg.start_cpu is not None:
                timings["writer_start_cpu"] = bg.start_cpu
            timings["final_write_wait"] = time.perf_counter() - t0
        except BaseException as e:
            bg.abort()
            if is_disk_full(e):
                raise disk_full_during_extract(path, need) from e
            raise
        finally:
            bar.close()
        warns = float16_warnings(f16_stats)
    if use_dist:
        import torch.distributed as dist

        dist.barrier()
        if own_pg:
            dist.destroy_process_group()
    done_mask = writer.done_mask()
    done = int(done_mask.sum())
    n_bad = int((done_mask & np.asarray(group["bad"][:], bool)).sum())
    timings["total"] = time.perf_counter() - t_start
    timings["images_per_s"] = written / timings["total"] if written else 0.0
    return ExtractResult(
        path=path,
        fingerprint=fp,
        num_images=writer.n,
        images_done=done,
        images_bad=n_bad,
        images_written=written,
        reused=not pending,
        bad=bad,
        timings=timings,
        rank=rank,
        world=world,
        warnings=dataset_warnings(dataset, detector) + warns,
        repaired=repaired,
        repaired_files=repaired_files,
    )
