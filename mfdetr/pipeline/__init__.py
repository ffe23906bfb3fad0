"""``mfdetr run``: TOML experiments (config), their stages and summary (stages), the cache budget (budget)."""

from mfdetr.pipeline.config import PipelineConfig, load_pipeline
from mfdetr.pipeline.stages import run_pipeline

__all__ = ["PipelineConfig", "load_pipeline", "run_pipeline"]
