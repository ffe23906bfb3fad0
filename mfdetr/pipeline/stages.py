"""`mfdetr run PIPELINE.toml`: data -> extract (train, val) -> train-from-cache -> evaluate -> summary.

Every stage is skipped when its result is already there for the same inputs:
- data: the synthetic dataset is made only when its annotation files are missing;
- extract: caches are found under ``cache_root`` by fingerprint (``extract`` itself re-uses them);
- train / evaluate: ``OUT/state.json`` records a key per stage (a hash of everything the stage
  depends on); a stage whose key matches and whose outputs exist is skipped, an unfinished training
  with the same key is resumed, and a different key in the same ``out`` is an error (pick another
  ``out`` or delete the folder), so no finished work is silently overwritten.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError
from mfdetr.pipeline.config import PipelineConfig
from mfdetr.utils.config import to_dict
from mfdetr.utils.hashing import sha256_json


@dataclass
class StageRecord:
    """What one stage did: ``ran`` False means it was skipped (result re-used)."""

    name: str
    seconds: float
    ran: bool
    detail: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[mfdetr run] {msg}", flush=True)


class _State:
    """``OUT/state.json``: per stage {key, done, seconds, detail}."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, stage: str) -> dict[str, Any]:
        return self.data.get(stage, {})

    def put(self, stage: str, **entry: Any) -> None:
        self.data[stage] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def check_key(self, stage: str, key: str, out: Path) -> None:
        old = self.get(stage).get("key")
        if old is not None and old != key:
            raise MfdetrError(
                f"{out} holds a {stage} result of a different configuration (key {old[:12]} != {key[:12]}); "
                f"choose another output folder (--set out=DIR) or delete {out}"
            )


def stage_data(cfg: PipelineConfig) -> StageRecord:
    """Make the synthetic dataset if the pipeline asks for it and it is missing."""
    t0 = time.perf_counter()
    splits = cfg.data.splits()
    if cfg.data.kind == "coco":
        for split, (images, ann) in splits.items():
            if not ann.is_file():
                raise MfdetrError(f"data.{split}_annotations: file not found: {ann}")
            if not images.is_dir():
                raise MfdetrError(f"data.{split}_images: folder not found: {images}")
        return StageRecord("data", time.perf_counter() - t0, False, {"kind": "coco"})
    want = {"train": cfg.data.train, "val": cfg.data.val}
    have = {}
    for split, (_, ann) in splits.items():
        if ann.is_file():
            meta = json.loads(ann.read_text())
            have[split] = len(meta.get("images", []))
    info = {"root": cfg.data.root, "train": cfg.data.train, "val": cfg.data.val}
    if have == want:
        _log(f"data: synthetic shapes found at {cfg.data.root} ({want['train']} train / {want['val']} val)")
        return StageRecord("data", time.perf_counter() - t0, False, info)
    from mfdetr.data.synth import make_synth

    _log(f"data: writing synthetic shapes to {cfg.data.root}")
    make_synth(
        Path(cfg.data.root), train=cfg.data.train, val=cfg.data.val, size=cfg.data.size, seed=cfg.data.seed
    )
    return StageRecord("data", time.perf_counter() - t0, True, info)


def stage_extract(
    cfg: PipelineConfig, split: str, calib_from: str | None = None, force: bool = False
) -> tuple[StageRecord, Any]:
    """Extract (or find by fingerprint) the cache of one split under ``cache_root``; ``calib_from``: the
    cache whose storage calibration it adopts (the val split reads in the train split's PCA bases);
    ``force``: extract even when the estimated size exceeds the disk's free space."""
    from mfdetr.extract.loop import extract

    images, ann = cfg.data.splits()[split]
    t0 = time.perf_counter()
    detector: Any = cfg.detector.spec
    if cfg.detector.label_map:  # extract builds from a spec by name; a label map needs the object
        from mfdetr.detectors.registry import build_detector

        categories = json.loads(ann.read_text()).get("categories")
        detector = build_detector(
            cfg.detector.spec,
            categories=categories,
            device=cfg.detector.device,
            levels=cfg.extract.levels,
            topk=cfg.extract.topk,
            label_map=cfg.detector.label_map,
        )
    res = extract(
        detector,
        images,
        ann,
        cache_root=Path(cfg.cache_root),
        opts=cfg.extract,
        device=cfg.detector.device,
        batch_size=cfg.detector.batch_size,
        workers=cfg.detector.workers,
        calib_from=calib_from,
        force=force,
    )
    detail = {"path": str(res.path), "fingerprint": res.fingerprint, "reused": bool(res.reused)}
    return StageRecord(f"extract-{split}", time.perf_counter() - t0, not res.reused, detail), res


def stage_train(
    cfg: PipelineConfig, state: _State, train_cache: str, val_cache: str, fps: dict
) -> StageRecord:
    """Train the mask network from the train cache (resume an unfinished run of the same key)."""
    from mfdetr.train.loop import train_from_cache

    out = cfg.out_dir / "train"
    key = sha256_json({"train": to_dict(cfg.train), "caches": fps})
    state.check_key("train", key, out)
    last = out / "checkpoints" / "last.pt"
    if state.get("train").get("done") and last.is_file():
        _log(f"train: finished run found at {out}")
        return StageRecord("train", 0.0, False, state.get("train").get("detail", {}))
    t0 = time.perf_counter()
    resume = last.is_file()
    _log(f"train: {'resuming' if resume else 'training'} the mask network in {out}")
    result = train_from_cache(train_cache, out, cfg.train, val_cache=val_cache, resume=resume)
    secs = time.perf_counter() - t0
    detail = {k: v for k, v in result.scalars().items() if isinstance(v, (int, float, str, bool))}
    state.put("train", key=key, done=True, seconds=secs, detail=detail)
    return StageRecord("train", secs, True, detail)


def stage_evaluate(cfg: PipelineConfig, state: _State, val_cache: str, ann: Path) -> tuple[StageRecord, dict]:
    """COCO mask, box, Boundary and occluded AP of the final checkpoint on the val cache."""
    from mfdetr.evaluate.config import EvalConfig
    from mfdetr.evaluate.evaluation import evaluate

    out = cfg.out_dir / "eval"
    ckpt = cfg.out_dir / "train" / "checkpoints" / "last.pt"
    key = sha256_json(
        {"train": state.get("train").get("key"), "eval": to_dict(cfg.evaluate), "val": val_cache}
    )
    state.check_key("evaluate", key, out)
    summary_path = out / "summary.json"
    if state.get("evaluate").get("done") and summary_path.is_file():
        _log(f"evaluate: summary found at {summary_path}")
        return StageRecord("evaluate", 0.0, False), json.loads(summary_path.read_text())
    t0 = time.perf_counter()
    # every field of the [evaluate] table, by name: a field evaluate does not know fails here, none is dropped
    result = evaluate(val_cache, ckpt, EvalConfig(**to_dict(cfg.evaluate)), annotations=ann, out=out)
    for w in result.warnings:
        _log(f"evaluate: warning: {w}")
    secs = time.perf_counter() - t0
    state.put("evaluate", key=key, done=True, seconds=secs)
    return StageRecord("evaluate", secs, True), result.summary()


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Run every stage of ``cfg``; returns the summary written to ``OUT/summary.json``. ``force``: extract
    even when a cache's estimated size exceeds its disk's free space."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / "state.json")
    (out / "pipeline.json").write_text(json.dumps(to_dict(cfg), indent=2))
    t_all = time.perf_counter()
    records = [stage_data(cfg)]
    r_train, train_res = stage_extract(cfg, "train", force=force)
    r_val, val_res = stage_extract(cfg, "val", calib_from=str(train_res.path), force=force)
    records += [r_train, r_val]
    fps = {"train": train_res.fingerprint, "val": val_res.fingerprint}
    records.append(stage_train(cfg, state, str(train_res.path), str(val_res.path), fps))
    r_eval, summary = stage_evaluate(cfg, state, str(val_res.path), cfg.data.splits()["val"][1])
    records.append(r_eval)
    result = build_summary(cfg, records, summary, train_res, val_res, time.perf_counter() - t_all)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(format_summary(result), flush=True)
    return result


def _cache_bytes(path: str) -> int:
    from mfdetr.cache.inspect import cache_info

    try:
        return int(cache_info(path)["bytes_on_disk"])
    except (MfdetrError, KeyError, OSError):
        return -1


def build_summary(cfg, records, summary, train_res, val_res, total_s) -> dict[str, Any]:
    """One dict: APs, time per stage, cache bytes, where the outputs are."""
    segm = summary.get("segm", {})
    bbox = summary.get("bbox_detector", summary.get("bbox", {}))
    train = next((r.detail for r in records if r.name == "train"), {})
    miou = train.get("val_miou")
    return {
        "pipeline": cfg.name,
        "mask_ap": segm.get("AP"),
        "box_ap": bbox.get("AP"),
        "mask_ap_over_box_ap": (segm["AP"] / bbox["AP"]) if segm.get("AP") and bbox.get("AP") else None,
        "boundary_ap": summary.get("boundary_ap"),
        "occluded_ap": summary.get("occluded_ap"),
        "val_miou": miou if isinstance(miou, float) and miou == miou else None,
        "segm": segm,
        "bbox": bbox,
        "stages": [
            {"name": r.name, "seconds": round(r.seconds, 2), "ran": r.ran, **r.detail} for r in records
        ],
        "total_seconds": round(total_s, 2),
        "cache_bytes": {"train": _cache_bytes(str(train_res.path)), "val": _cache_bytes(str(val_res.path))},
        "out": str(cfg.out_dir),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The table ``mfdetr run`` prints at the end."""

    def ap(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        "",
        f"== {s['pipeline']} ==",
        f"frozen detector box AP  {ap(s['box_ap'])}",
        f"mask AP                 {ap(s['mask_ap'])}   (mask AP / box AP = {ap(s['mask_ap_over_box_ap'])})",
        f"Boundary AP             {ap(s.get('boundary_ap'))}   (min(mask IoU, boundary IoU), band 2% of the diagonal)",
        f"occluded AP             {ap(s.get('occluded_ap'))}   (mask AP on GT instances >= 10% covered by others)",
        f"val mean mask IoU       {ap(s.get('val_miou'))}   (matched boxes, last epoch)",
        "",
        f"{'stage':<16}{'seconds':>10}  {'status':<8}",
    ]
    for r in s["stages"]:
        lines.append(f"{r['name']:<16}{r['seconds']:>10.1f}  {'ran' if r['ran'] else 'reused':<8}")
    lines.append(f"{'total':<16}{s['total_seconds']:>10.1f}")
    for split, b in s["cache_bytes"].items():
        if b >= 0:
            lines.append(f"cache {split}: {b / 2**20:.1f} MiB")
    lines.append(f"outputs: {s['out']} (summary.json, eval/, train/)")
    return "\n".join(lines)
