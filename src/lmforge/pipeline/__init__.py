"""Pipelines: `lmforge run PIPELINE.yaml` runs named stages in DAG order and skips the up-to-date ones
(docs/PIPELINES.md). `spec` reads the file, `graph` derives inputs/outputs and the order, `state` decides
what is up to date, `runner` runs the stages."""

from lmforge.pipeline.runner import reproduce, run_pipeline
from lmforge.pipeline.spec import Pipeline, PipelineError, Stage, load_pipeline

__all__ = ["Pipeline", "PipelineError", "Stage", "load_pipeline", "reproduce", "run_pipeline"]
