"""Experiment tracking (`train.loggers`: TensorBoard, MLflow, W&B) and run comparison (`lmforge runs`)."""

from lmforge.track.loggers import BACKENDS, Trackers, check_loggers

__all__ = ["BACKENDS", "Trackers", "check_loggers"]
