"""Configuration: frozen pydantic models, YAML loading with ${ENV} interpolation, JSON Schema."""

from sluice.config.loader import json_schema, load_pipeline, parse_pipeline
from sluice.config.models import PipelineConfig

__all__ = ["PipelineConfig", "json_schema", "load_pipeline", "parse_pipeline"]
