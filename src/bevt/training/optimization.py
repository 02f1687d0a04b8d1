"""The optimizer and its schedule, built one way for every script.

- `build_param_groups(model, weight_decay, ...)`: AdamW parameter groups with no weight decay on norms, biases,
  relative position bias tables and the mask token, and optional per-parameter learning-rate scales.
- `layer_decay_lr_scale(depths, layer_decay, backbone_lr_multiplier)`: the official BEVT fine-tuning rule, to pass
  as `lr_scale`. Backbone "layers" are counted from the top: the final norm and the last block get `decay**1`, each
  earlier block or patch-merging layer one more power, the patch embedding `decay**(L + 1)` with
  `L = sum(depths) + num_stages - 1` (0.9**28 for Swin-B). Every backbone parameter is also multiplied by
  `backbone_lr_multiplier`; the classifier keeps the base lr.
- `build_optimizer(model, args, lr_scale=None)`: AdamW from the optimizer arguments (`--learning_rate`,
  `--weight_decay`, `--adam_*`).
- `resolve_schedule(...)` -> `Schedule`: optimizer steps per epoch, in total, of warmup and between evaluations,
  from the data size and the schedule flags; `build_lr_scheduler(args, optimizer, schedule)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from .arguments import fail

__all__ = [
    "DEFAULT_NO_DECAY_KEYWORDS",
    "Schedule",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "layer_decay_lr_scale",
    "layer_unit",
    "num_layer_units",
    "resolve_schedule",
]

# Parameters whose name contains one of these get no weight decay (as in the official BEVT/Swin recipes), in
# addition to every 1-D parameter (norm weights, biases).
DEFAULT_NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "relative_position_bias_table",
    "mask_token",
    "position_embeddings",
    "absolute_pos_embed",
    "cls_token",
)


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    skip_keywords: Iterable[str] = DEFAULT_NO_DECAY_KEYWORDS,
    lr_scale: Callable[[str], float] | None = None,
    learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices/kernels, none on 1-D parameters (norms, biases) and
    on parameters whose name contains one of `skip_keywords`.

    Args:
        model: the (unwrapped) model; frozen parameters (`requires_grad=False`) are left out.
        weight_decay: decay of the decayed group (>= 0).
        skip_keywords: name substrings that disable decay (relative position bias tables, mask token, ...).
        lr_scale: optional `name -> float` learning-rate multiplier (e.g. layer-wise decay). Parameters are grouped
            by (decay, scale); each group records its `lr_scale`.
        learning_rate: when given, every group gets `lr = learning_rate * lr_scale`. LambdaLR-based schedulers
            (Transformers' `get_scheduler`) multiply each group's initial lr, so the scales survive the schedule.

    Returns:
        A list of dicts for `torch.optim.AdamW(...)`, each with `params`, `weight_decay`, `lr_scale` (and `lr`),
        and `param_names` (for inspection; ignored by the optimizer). Empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
    keywords = tuple(skip_keywords)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        if not scale >= 0 or not math.isfinite(scale):
            raise ValueError(f"`lr_scale` returned {scale!r} for {name!r}; it must be a finite number >= 0")
        key = (not no_decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if key[0] else 0.0,
                "lr_scale": scale,
            }
            if learning_rate is not None:
                groups[key]["lr"] = learning_rate * scale
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    # Stable order: decayed before non-decayed, then by scale, so optimizer state dicts line up across runs.
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^encoder\.layers\.(\d+)\.(?:blocks\.(\d+)|(downsample))\.")


def num_layer_units(depths: Sequence[int]) -> int:
    """Blocks plus patch-merging layers of the encoder (`L`): 27 for Swin-B (2-2-18-2)."""
    return sum(depths) + len(depths) - 1


def layer_unit(name: str, depths: Sequence[int], prefix: str = "bevt.") -> int | None:
    """Position of a backbone parameter counted from the bottom: embeddings 0, then every block and patch-merging
    layer in forward order 1..L, the final norm L (shared with the last block). None outside the backbone.

    Raises:
        ValueError: a backbone parameter that fits no rule (a new module the rule does not know).
    """
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    if rest.startswith("embeddings."):
        return 0
    if rest.startswith("layernorm."):
        return num_layer_units(depths)
    match = _BLOCK_RE.match(rest)
    if match is None:
        raise ValueError(f"no layer-wise lr decay rule for backbone parameter {name!r}")
    stage = int(match.group(1))
    if stage >= len(depths):
        raise ValueError(f"parameter {name!r} is in stage {stage}, but the config has {len(depths)} stages")
    before = sum(depths[:stage]) + stage  # blocks and patch-merging layers of the earlier stages
    if match.group(3):
        return before + depths[stage] + 1
    return before + int(match.group(2)) + 1


def layer_decay_lr_scale(
    depths: Sequence[int],
    layer_decay: float = 1.0,
    backbone_lr_multiplier: float = 1.0,
    prefix: str = "bevt.",
) -> Callable[[str], float]:
    """`name -> lr multiplier`: `backbone_lr_multiplier * layer_decay ** (L + 1 - layer_unit(name))` for backbone
    parameters, 1 for the others (the classifier). See the module docstring."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    if not backbone_lr_multiplier >= 0:
        raise ValueError(f"backbone_lr_multiplier must be >= 0, got {backbone_lr_multiplier!r}")
    top = num_layer_units(depths) + 1

    def scale(name: str) -> float:
        unit = layer_unit(name, depths, prefix)
        if unit is None:
            return 1.0
        return backbone_lr_multiplier * layer_decay ** (top - unit)

    return scale


def build_optimizer(
    model: nn.Module, args: Any, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, args.weight_decay, lr_scale=...)` with `args.learning_rate`,
    `args.adam_beta1`, `args.adam_beta2`, `args.adam_epsilon` (the `OptimizerArguments` fields)."""
    groups = build_param_groups(model, args.weight_decay, lr_scale=lr_scale, learning_rate=args.learning_rate)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


# ---------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps derived from the data size: per epoch (None without a sample count), in total, of warmup,
    and between evaluations (None: only at the end)."""

    steps_per_epoch: int | None
    max_train_steps: int
    num_warmup_steps: int
    eval_steps: int | None = None

    def epoch(self, step: int) -> float | None:
        return step / self.steps_per_epoch if self.steps_per_epoch else None

    @property
    def num_evaluations(self) -> int:
        """Evaluations during the run: every `eval_steps` and once at the end (1 without `eval_steps`)."""
        if not self.eval_steps:
            return 1
        return math.ceil(self.max_train_steps / self.eval_steps)


MANY_EVALUATIONS = 50  # more evaluations than this from an epoch cadence: most likely tiny epochs, not a choice


def frequent_evaluation_warning(schedule: Schedule, eval_steps_given: bool) -> str | None:
    """A warning when the evaluation cadence, derived from epochs (`--eval_every_epochs`, not `--eval_steps`),
    evaluates more than `MANY_EVALUATIONS` times: a few labeled clips (`--max_train_samples`) make epochs of a step
    or two, and evaluating after each can take longer than the training. None when the cadence is fine or chosen."""
    if eval_steps_given or schedule.num_evaluations <= MANY_EVALUATIONS:
        return None
    return (
        f"evaluating every {schedule.eval_steps} steps (every {schedule.eval_steps / schedule.steps_per_epoch:g} "
        f"epochs of {schedule.steps_per_epoch} steps) makes {schedule.num_evaluations} evaluations in "
        f"{schedule.max_train_steps} steps; pass --eval_steps N (or a larger --eval_every_epochs) to evaluate less often"
    )


def resolve_schedule(
    *,
    samples_per_epoch: int | None,
    samples_per_step: int,
    max_train_steps: int | None,
    num_train_epochs: float | None,
    num_warmup_steps: int | None = None,
    warmup_epochs: float | None = None,
    warmup_ratio: float | None = None,
    eval_steps: int | None = None,
    eval_every_epochs: float | None = None,
) -> Schedule:
    """The run's `Schedule`.

    Args:
        samples_per_epoch: samples of one pass over the data (all ranks; from `dataset_info.json`), or None.
        samples_per_step: samples per optimizer step, all ranks and accumulation steps together.
        max_train_steps: `--max_train_steps` (wins over epochs); None: `num_train_epochs` passes over the data.
        num_warmup_steps: `--num_warmup_steps` (wins); else `warmup_epochs` (needs the sample count), else
            `warmup_ratio` of the run; the warmup is capped at one step less than the run.
        eval_steps: `--eval_steps` (wins); else every `eval_every_epochs` (needs the sample count); else None.
    """
    steps_per_epoch = math.ceil(samples_per_epoch / samples_per_step) if samples_per_epoch else None
    if max_train_steps is None:
        if steps_per_epoch is None:
            fail(
                "--max_train_steps",
                "given when the shards have no dataset_info.json (needed to turn --num_train_epochs into steps)",
                None,
            )
        max_train_steps = max(1, math.ceil(num_train_epochs * steps_per_epoch))
    if num_warmup_steps is not None:
        warmup = num_warmup_steps
    elif warmup_epochs is not None and steps_per_epoch is not None:
        warmup = round(warmup_epochs * steps_per_epoch)
    elif warmup_ratio is not None:
        warmup = int(warmup_ratio * max_train_steps)
    else:
        warmup = 0
    warmup = min(warmup, max_train_steps - 1) if max_train_steps > 1 else 0
    if eval_steps is None and eval_every_epochs is not None and steps_per_epoch is not None:
        eval_steps = max(1, round(eval_every_epochs * steps_per_epoch))
    return Schedule(steps_per_epoch, max_train_steps, warmup, eval_steps)


def build_lr_scheduler(args: Any, optimizer: torch.optim.Optimizer, schedule: Schedule) -> Any:
    """Transformers' `get_scheduler(args.lr_scheduler_type, ...)`: linear warmup, then the chosen decay."""
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=schedule.num_warmup_steps,
        num_training_steps=schedule.max_train_steps,
    )
