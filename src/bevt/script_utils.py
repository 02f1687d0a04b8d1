"""Command-line plumbing shared by `run_pretraining.py` and `run_finetuning.py`.

`bevt.training` holds the model- and data-independent training pieces (checkpoints, signals, meters); this module
holds what both *scripts* repeat around them:

- flags: `HelpFormatter`, `fail`, and the argparse flags both scripts define the same way (`add_compute_args`,
  `add_adam_args`, `add_run_control_args`, `add_checkpoint_args`, `add_tracking_args`, `add_hub_args`); where the
  scripts' help texts differ, the caller passes them.
- validation: `require_positive_ints`, `require_non_negative`, `require_unit_interval`, `validate_optimizer_args`,
  `validate_step_count_args` (every error reads `error: <flag> must be <expected>, got <value>`).
- setup: `build_accelerator`, `setup_logging`, `start_run`, `write_demo_data_once`, `resume_if_requested`,
  `init_tracking`.
- loop: `progress_bar`, `WindowMeters`, `reduce_step_stats`, `clip_and_step`.
- end: `push_to_hub`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration
from tqdm.auto import tqdm

from .training import (
    AverageMeter,
    CheckpointManager,
    NonFiniteLossGuard,
    ResumedState,
    StepTimer,
    ThroughputMeter,
)

__all__ = [
    "HUB_IGNORE_PATTERNS",
    "SCHEDULERS",
    "HelpFormatter",
    "WindowMeters",
    "add_adam_args",
    "add_checkpoint_args",
    "add_compute_args",
    "add_hub_args",
    "add_run_control_args",
    "add_tracking_args",
    "build_accelerator",
    "clip_and_step",
    "fail",
    "init_tracking",
    "progress_bar",
    "push_to_hub",
    "reduce_step_stats",
    "require_non_negative",
    "require_positive_ints",
    "require_unit_interval",
    "resume_if_requested",
    "setup_logging",
    "start_run",
    "validate_optimizer_args",
    "validate_step_count_args",
    "write_demo_data_once",
]

logger = get_logger(__name__)

Manifest = TypeVar("Manifest")  # what a demo-data writer returns

SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial")

# Never uploaded by `push_to_hub`: checkpoints (and the temporary folders of their atomic saves/rotation) and the
# demo's synthetic shards. Each script adds its own (tracker logs, ...).
HUB_IGNORE_PATTERNS: tuple[str, ...] = ("checkpoint-*", ".tmp-*", ".old-*", ".deleting-*", "demo_data/*")


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to every flag's help unless the help already states its defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default:" in help_text:
            return help_text
        return super()._get_help_string(action)


def fail(flag: str, expected: str, got: Any) -> NoReturn:
    """Exit with `error: <flag> must be <expected>, got <value>`."""
    raise SystemExit(f"error: {flag} must be {expected}, got {got!r}")


def add_adam_args(group: argparse._ArgumentGroup, *, scheduler_help: str) -> None:
    """`--adam_beta1`, `--adam_beta2`, `--adam_epsilon` and `--lr_scheduler_type` (one of `SCHEDULERS`)."""
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    group.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="cosine", help=scheduler_help)


def add_compute_args(group: argparse._ArgumentGroup) -> None:
    """`--gradient_checkpointing` and `--torch_compile` (read by the scripts' model setup and `build_accelerator`)."""
    group.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in backward."
    )
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the encoder (the bulk of the compute) with torch.compile (inductor, static shapes); the heads "
        "and losses, which select masked positions or labels, stay eager. The first steps pay the compilation.",
    )


def add_run_control_args(
    group: argparse._ArgumentGroup, *, mixed_precision_help: str, seed_help: str
) -> None:
    """`--max_nonfinite_steps` (default 5), `--mixed_precision` (no/fp16/bf16) and `--seed` (default 42)."""
    group.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=5,
        help="Stop after this many consecutive steps with a NaN/inf loss or gradient (each is skipped).",
    )
    group.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help=mixed_precision_help
    )
    group.add_argument("--seed", type=int, default=42, help=seed_help)


def add_checkpoint_args(
    group: argparse._ArgumentGroup,
    *,
    output_dir_help: str,
    checkpointing_steps_help: str,
    save_total_limit_help: str,
    logging_steps_help: str,
) -> None:
    """`--output_dir`, `--checkpointing_steps`, `--save_total_limit`, `--resume_from_checkpoint`, `--logging_steps`.

    All default to None (the scripts fill `output_dir`, `checkpointing_steps` and `logging_steps` from their
    recipe/demo defaults, which the help texts state).
    """
    group.add_argument("--output_dir", default=None, help=output_dir_help)
    group.add_argument("--checkpointing_steps", type=int, default=None, help=checkpointing_steps_help)
    group.add_argument("--save_total_limit", type=int, default=None, help=save_total_limit_help)
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest': the newest complete one in --output_dir (none yet: start fresh, so "
        "a pre-emptible job can always pass 'latest').",
    )
    group.add_argument("--logging_steps", type=int, default=None, help=logging_steps_help)


def add_tracking_args(group: argparse._ArgumentGroup) -> None:
    """`--with_tracking` and `--report_to` (Accelerate trackers, default tensorboard)."""
    group.add_argument(
        "--with_tracking", action="store_true", help="Log metrics with the --report_to tracker."
    )
    group.add_argument(
        "--report_to", default="tensorboard", help="Accelerate tracker(s): tensorboard, wandb, all, ..."
    )


def add_hub_args(group: argparse._ArgumentGroup, *, push_help: str) -> None:
    """`--push_to_hub`, `--hub_model_id` and `--hub_token` (see `push_to_hub`)."""
    group.add_argument("--push_to_hub", action="store_true", help=push_help)
    group.add_argument(
        "--hub_model_id", default=None, help="Hub repository (default: the output folder's name)."
    )
    group.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def require_positive_ints(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Each `--name` must be an integer >= 1 (a bool is refused)."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f"--{name}", "a positive integer", value)


def require_non_negative(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Each `--name` must be >= 0 (NaN is refused)."""
    for name in names:
        if not getattr(args, name) >= 0:
            fail(f"--{name}", ">= 0", getattr(args, name))


def require_unit_interval(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Each `--name` must lie in [0, 1] (probabilities)."""
    for name in names:
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name}", "in [0, 1]", getattr(args, name))


def validate_optimizer_args(args: argparse.Namespace) -> None:
    """`--learning_rate` > 0, AdamW betas in [0, 1), `--num_warmup_steps` >= 0 when given."""
    if not args.learning_rate > 0:
        fail("--learning_rate", "> 0", args.learning_rate)
    if not 0 <= args.adam_beta1 < 1 or not 0 <= args.adam_beta2 < 1:
        fail("--adam_beta1/--adam_beta2", "in [0, 1)", (args.adam_beta1, args.adam_beta2))
    if args.num_warmup_steps is not None and args.num_warmup_steps < 0:
        fail("--num_warmup_steps", ">= 0", args.num_warmup_steps)


def validate_step_count_args(args: argparse.Namespace) -> None:
    """`--max_train_steps` >= 1 when given, else a positive `--num_train_epochs`."""
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail("--max_train_steps", "a positive integer", args.max_train_steps)
    if args.max_train_steps is None and not (args.num_train_epochs or 0) > 0:
        fail("--max_train_steps or --num_train_epochs", "given (positive)", None)


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerator with per-rank data reading (`dispatch_batches=False`: every rank decodes its own shards)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("--mixed_precision fp16 has no effect on CPU (Accelerate ignores it); use bf16 or no.")
    return accelerator


def compile_encoder(model: torch.nn.Module) -> None:
    """`--torch_compile`: compile the BEVT encoder in place (`nn.Module.compile`, inductor, `dynamic=False`).

    The encoder (Swin stages) holds nearly all the compute and sees fixed shapes per stream (one graph for videos,
    one for images, one more per other batch size). Compiling the whole model instead traces the heads' selection of
    masked positions (data-dependent sizes), which forces dynamic shapes and failed in inductor on CPU. State-dict keys
    do not change (no `_orig_mod.` prefix). Call it on the unwrapped model, after the EMA copy is made and after
    `accelerator.prepare`."""
    if next(model.parameters()).device.type == "cpu":
        logger.warning(
            "--torch_compile on CPU: the compiled encoder is slower than the eager one here (measured 1.3x slower "
            "for a Swin-T step, see BENCHMARKS.md): compiled graphs use MKL matmuls instead of the oneDNN linears."
        )
    model.bevt.encoder.compile(dynamic=False)


def setup_logging(accelerator: Accelerator, *, quiet_accelerate: bool) -> None:
    """INFO logs on the local main process (warnings and errors elsewhere).

    `quiet_accelerate=True` also turns Accelerate's own INFO logs (one line per file of every checkpoint save) off.
    """
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    if quiet_accelerate:
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        logging.getLogger().setLevel(logging.ERROR)


def start_run(args: argparse.Namespace, *, quiet_accelerate: bool) -> Accelerator:
    """`build_accelerator` + `setup_logging`, log the distributed setup, create `--output_dir` (main process)."""
    accelerator = build_accelerator(args)
    setup_logging(accelerator, quiet_accelerate=quiet_accelerate)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def write_demo_data_once(
    accelerator: Accelerator, folder: str | Path, write: Callable[[Path], Manifest]
) -> Manifest:
    """Run the demo-data writer `write(folder)` on the main process, then on every rank (where it only reads the
    manifest the main process wrote); returns that manifest."""
    folder = Path(folder)
    if accelerator.is_main_process:
        started = time.perf_counter()
        write(folder)
        logger.info(f"demo data ready in {folder} ({time.perf_counter() - started:.1f}s)")
    accelerator.wait_for_everyone()
    return write(folder)


def resume_if_requested(
    args: argparse.Namespace,
    accelerator: Accelerator,
    manager: CheckpointManager,
    load_data_state: Callable[[Any], None],
) -> ResumedState | None:
    """Restore `--resume_from_checkpoint` (a folder, or `latest`) on every rank; None when there is nothing to resume.

    `latest` with no checkpoint yet starts fresh (logged), so a pre-emptible job can always pass it. The checkpoint's
    per-rank data state goes to `load_data_state`.
    """
    if args.resume_from_checkpoint == "latest" and manager.latest() is None:
        logger.info(
            f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet, starting from scratch"
        )
        return None
    if not args.resume_from_checkpoint:
        return None
    try:
        path = manager.resolve(args.resume_from_checkpoint)
    except (FileNotFoundError, ValueError) as err:  # the messages name the flag and the folder
        raise SystemExit(f"error: {err}") from None
    resumed = manager.load(accelerator, path)
    load_data_state(resumed.data_state)
    logger.info(f"resumed from {path} at step {resumed.step}")
    return resumed


def init_tracking(args: argparse.Namespace, accelerator: Accelerator, project_name: str) -> None:
    """With `--with_tracking`: start the trackers with every flag as a hyperparameter (non-scalars as strings)."""
    if args.with_tracking:
        hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(project_name, config=hparams)


# ---------------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------------


def progress_bar(accelerator: Accelerator, total: int, initial: int, desc: str) -> tqdm:
    """Optimizer-step progress bar, shown on the local main process only."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )


@dataclass
class WindowMeters:
    """What the loop measures between two log lines: running means of named scalars (`window`), the time per step
    phase (`timer`), and samples per second per stream (`throughput`: a sliding window, not reset)."""

    window: dict[str, AverageMeter]
    timer: StepTimer = field(default_factory=StepTimer)
    throughput: dict[str, ThroughputMeter] = field(default_factory=dict)

    @classmethod
    def of(cls, names: Iterable[str], streams: Iterable[str] = ()) -> WindowMeters:
        """One `AverageMeter` per scalar name and one `ThroughputMeter` per stream."""
        return cls(
            window={name: AverageMeter() for name in names},
            throughput={stream: ThroughputMeter() for stream in streams},
        )

    def averages(self) -> dict[str, float]:
        """Mean of each scalar over the window (NaN when no step was recorded)."""
        return {name: meter.avg for name, meter in self.window.items()}

    @staticmethod
    def tracker_values(averages: dict[str, float], lr: float, guard: NonFiniteLossGuard) -> dict[str, float]:
        """`train/<name>` of the finite averages, `train/lr`, `train/nonfinite_steps_skipped`."""
        values: dict[str, float] = {f"train/{name}": v for name, v in averages.items() if not math.isnan(v)}
        values["train/lr"] = lr
        values["train/nonfinite_steps_skipped"] = guard.total_skipped
        return values

    def reset(self) -> None:
        """Start a new window (scalar means and phase timings; throughput keeps its sliding window)."""
        for meter in self.window.values():
            meter.reset()
        self.timer.reset()


def reduce_step_stats(
    accelerator: Accelerator, micro_stats: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, bool]:
    """Average the per-micro-batch statistics of one optimizer step over micro-batches and ranks (collective).

    Returns the mean (non-finite entries of any rank counted as 0) and whether every rank's statistics were finite.
    """
    local = torch.stack(list(micro_stats)).mean(0).to(accelerator.device)
    nonfinite = (~torch.isfinite(local)).any().float().reshape(1)
    reduced = accelerator.reduce(torch.cat([torch.nan_to_num(local, 0.0, 0.0, 0.0), nonfinite]), "sum")
    return reduced[:-1] / accelerator.num_processes, reduced[-1].item() == 0


def clip_and_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    guard: NonFiniteLossGuard,
    *,
    finite: bool,
    max_grad_norm: float,
    step: int,
) -> tuple[bool, float]:
    """Clip the gradients, then apply the update unless `finite` is False or the gradient norm is NaN/inf.

    With the fp16 grad scaler, `optimizer.step()` always runs: the scaler itself skips steps with inf/NaN gradients
    and lowers its scale. The gradients are dropped and the schedule advances either way. `max_grad_norm` 0 means
    no clipping. `clip_grad_norm_` returns no norm under DeepSpeed (it clips itself): the norm is then reported as
    NaN and the step is not counted as non-finite. Returns (applied, gradient norm); raises
    `NonFiniteLossError` (from `guard`) after too many skipped steps in a row.
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = float(norm) if norm is not None else math.nan
    if accelerator.scaler is None and norm is not None and not math.isfinite(grad_norm):
        finite = False
    applied = guard.update(finite, step)
    if applied or accelerator.scaler is not None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return applied, grad_norm


# ---------------------------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------------------------


def push_to_hub(args: argparse.Namespace, *, commit_message: str, ignore_patterns: Iterable[str]) -> None:
    """Upload `--output_dir` to `--hub_model_id` (default: the output folder's name), creating the repository."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
    )
    logger.info(f"pushed to https://huggingface.co/{repo_id}")
