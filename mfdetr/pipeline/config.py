"""The experiment file (`pipelines/*.toml`) as typed dataclasses.

A pipeline names the dataset (train/val), the frozen detector, the extraction options, the mask
network + schedule, and the evaluation. Every key can be overridden on the command line with
``--set section.key=value`` (TOML literal syntax for the value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mfdetr.cache.schema import ExtractOptions
from mfdetr.train.config import TrainConfig
from mfdetr.errors import MfdetrError
from mfdetr.utils.config import apply_overrides, from_dict, load_toml
from mfdetr.evaluate.config import EvalConfig


@dataclass
class DataConfig:
    """Where the COCO-format data comes from.

    kind: "synth" makes the embedded shapes dataset under ``root`` if it is missing
        (``train``/``val`` images of ``size`` px from ``seed``); "coco" reads the four paths below.
    """

    kind: Literal["synth", "coco"] = "synth"
    root: str = "data/shapes"
    train: int = 2000
    val: int = 300
    size: int = 192
    seed: int = 0
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""

    def splits(self) -> dict[str, tuple[Path, Path]]:
        """{"train": (images dir, annotations json), "val": (...)}."""
        if self.kind == "synth":
            root = Path(self.root)
            return {s: (root / s / "images", root / s / "annotations.json") for s in ("train", "val")}
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            if not getattr(self, key):
                raise MfdetrError(f"data.kind = 'coco' needs data.{key} (a path) in the pipeline file")
        return {
            "train": (Path(self.train_images), Path(self.train_annotations)),
            "val": (Path(self.val_images), Path(self.val_annotations)),
        }


@dataclass
class DetectorConfig:
    """The frozen detector: a spec (``shapes``, ``hf:PATH``, ``py:module:function``) and its options.

    label_map: optional JSON {model_label_id: dataset_category_id}; default maps labels by name.
    batch_size / workers / device: how extraction runs it.
    """

    spec: str = "shapes"
    label_map: str | None = None
    batch_size: int = 8
    workers: int = 2
    device: str = "cpu"


@dataclass
class PipelineConfig:
    """One experiment. ``out`` defaults to ``runs/<name>``; caches go under ``cache_root``."""

    name: str = "experiment"
    description: str = ""
    out: str = ""
    cache_root: str = "cache"
    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_pipeline_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The pipeline file as a dict, with ``base = "other.toml"`` (relative to the file) merged under it.

    ``name`` is never inherited: it defaults to the file's stem, so an ablation that only changes the
    mask network gets its own output folder while sharing the base's caches.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise MfdetrError(f"pipeline files include each other in a loop: {[str(p) for p in _seen]}")
    data = load_toml(path)
    name = data.get("name", path.stem)
    base = data.pop("base", None)
    if base is not None:
        data = _merge({k: v for k, v in read_pipeline_dict(path.parent / base, _seen + (path,)).items()
                       if k != "name"}, data)
    data["name"] = name
    return data


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline TOML (with its ``base``), apply ``key=value`` overrides, build the typed config."""
    data = apply_overrides(read_pipeline_dict(path), overrides or [])
    cfg = from_dict(PipelineConfig, data)
    cfg.extract.validate()
    return cfg
