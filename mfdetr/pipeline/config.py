"""The experiment file (`pipelines/*.toml`) as typed dataclasses.

A pipeline names the dataset (train/val), the frozen detector, the extraction options, the mask
network + schedule, and the evaluation. Every key can be overridden on the command line with
``--set section.key=value`` (TOML literal syntax for the value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mfdetr.cache.schema import ExtractOptions
from mfdetr.errors import MfdetrError
from mfdetr.evaluate.config import EvalConfig
from mfdetr.train.config import TrainConfig
from mfdetr.utils.config import apply_overrides, from_dict, load_toml_with_base


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


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline TOML (with its ``base``), apply ``key=value`` overrides, build the typed config."""
    data = apply_overrides(load_toml_with_base(path), overrides or [])
    cfg = from_dict(PipelineConfig, data)
    cfg.extract.validate()
    return cfg
