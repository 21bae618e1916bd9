"""Shared training-loop parts: accelerator setup, optimizer + scheduler, checkpoint/resume,
the metric aggregator (docs/training/METRICS_CONTRACT.md), the Two-Channel router (docs/training/STAGE2_RUNBOOK.md), tracking and progress.

No model code lives here; ``train_stage1.py`` / ``train_stage2.py`` wire these together.
"""

from training.aggregator import (
    F1,
    ROLLOUT_DERIVED,
    STEP_DERIVED,
    MetricAggregator,
    Ratio,
    check_metric_key,
    classify_key,
)
from training.checkpoint import (
    TrainerState,
    find_latest_checkpoint,
    load_training_state,
    save_training_state,
)
from training.optim import build_optimizer, build_scheduler
from training.progress import TrainProgress
from training.router import ChannelRouter, is_rollout_step
from training.setup import log_run_header, make_accelerator, make_run_dir, setup_logging
from training.tracking import Tracker, read_metrics

__all__ = [
    "F1",
    "ROLLOUT_DERIVED",
    "STEP_DERIVED",
    "ChannelRouter",
    "MetricAggregator",
    "Ratio",
    "Tracker",
    "TrainProgress",
    "TrainerState",
    "build_optimizer",
    "build_scheduler",
    "check_metric_key",
    "classify_key",
    "find_latest_checkpoint",
    "is_rollout_step",
    "load_training_state",
    "log_run_header",
    "make_accelerator",
    "make_run_dir",
    "read_metrics",
    "save_training_state",
    "setup_logging",
]
