"""Training runs: one loop for every script, and what it needs.

- `engine`: `TrainingEngine` (the loop: accumulation, non-finite guard, signals and exit codes, logging, progress
  bar, evaluation and checkpoint cadence, exact resume), driven by a step function (`StepOutput`, `StepContext`).
- `arguments`: typed arguments (dataclasses parsed by `HfArgumentParser`, `--config run.yaml|run.json`,
  `training_args.json`), the groups every script shares, and the recipes mechanism.
- `checkpoints`: `CheckpointManager` (atomic, rotated, per-rank data state, safe loading of custom states).
- `optimization`: parameter groups, layer-wise lr decay, AdamW, the schedule.
- `ema`: `ModelEMA`. `evaluation`: multi-view evaluation and reports. `guards`, `meters`: the loop's parts.
- `runtime`: Accelerator, logging, output folder, demo data, Hub upload, the scripts' entry point.
- `pretraining_arguments`, `finetuning_arguments`, `tokenizer_arguments`: the arguments and recipes of
  `run_pretraining.py`, `run_finetuning.py` and `run_tokenizer_training.py`; `pretraining_outputs`: the pictures
  and `training_results.json` of `run_pretraining.py`.
"""

from .arguments import BEVTArgumentParser, UsageError, fail, save_training_args, tracker_config
from .checkpoints import (
    COMPLETE_MARKER,
    DATA_STATE_PATTERN,
    TRAINER_STATE_NAME,
    CheckpointManager,
    ResumedState,
)
from .ema import ModelEMA
from .engine import StepContext, StepOutput, StepResult, TrainingEngine, TrainState, optimizer_step
from .guards import GracefulExit, NonFiniteLossError, NonFiniteLossGuard, is_finite
from .meters import AverageMeter, StepTimer, ThroughputMeter, WindowMeters
from .optimization import (
    DEFAULT_NO_DECAY_KEYWORDS,
    Schedule,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    frequent_evaluation_warning,
    layer_decay_lr_scale,
    layer_unit,
    num_layer_units,
    resolve_schedule,
)

__all__ = [
    "COMPLETE_MARKER",
    "DATA_STATE_PATTERN",
    "DEFAULT_NO_DECAY_KEYWORDS",
    "TRAINER_STATE_NAME",
    "AverageMeter",
    "BEVTArgumentParser",
    "CheckpointManager",
    "GracefulExit",
    "ModelEMA",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ResumedState",
    "Schedule",
    "StepContext",
    "StepOutput",
    "StepResult",
    "StepTimer",
    "ThroughputMeter",
    "TrainState",
    "TrainingEngine",
    "UsageError",
    "WindowMeters",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "fail",
    "frequent_evaluation_warning",
    "is_finite",
    "layer_decay_lr_scale",
    "layer_unit",
    "num_layer_units",
    "optimizer_step",
    "resolve_schedule",
    "save_training_args",
    "tracker_config",
]
