"""The training loop of every BEVT script: scripts differ in their step function, not in their loop.

`TrainingEngine` owns what a long run needs around a step: gradient accumulation, the non-finite guard (a step
whose loss or gradient norm is NaN/inf on any rank is skipped on every rank; too many in a row stop the run),
SIGTERM/SIGINT (a checkpoint, then exit status 128 + signal, on every rank), logging and tracker scalars, the
progress bar, the evaluation and checkpoint cadence, exact resume (model, optimizer, schedule, EMA, RNG of every
rank, data position of every rank, the loop's counters and any registered state), the end-of-run summary and, in
data-parallel runs, a check that every rank ends with the same weights (`check_replicas`).

A step function gets one micro-batch and returns the loss to back-propagate plus the scalars to log; it runs under
`accelerator.autocast()` inside `accelerator.accumulate(model)`. Anything with a step works, e.g. training the
visual tokenizer (a step that is neither pretraining nor classification)::

    def tokenizer_step(batch, context: StepContext) -> StepOutput:
        pixels = batch["pixel_values"].to(context.accelerator.device, non_blocking=True)
        out = model(pixel_values=pixels)                     # e.g. reconstruction + commitment losses
        return StepOutput(out.loss, {"loss": out.loss, "reconstruction": out.reconstruction_loss})

    engine = TrainingEngine(
        accelerator, model, optimizer, lr_scheduler, train_loader,   # a StreamDataLoader (or any resumable iterable)
        args=args,                      # an arguments dataclass with the shared groups (bevt.training.arguments)
        schedule=schedule,              # bevt.training.resolve_schedule(...)
        streams={"image": args.per_device_train_batch_size},   # samples per micro-step and stream, for throughput
        project_name="bevt_tokenizer",
    )
    engine.resume()                     # --resume_from_checkpoint (a folder or "latest")
    exit_code = engine.run(tokenizer_step, evaluate=None)   # 0, 1 (non-finite / bad data) or 128 + signal

`train_data` is iterated once (it must not end: stop on a step count) and must have `state_dict()` /
`load_state_dict()` (JSON-compatible per-rank positions, saved in every checkpoint); `skipped_counts()`, when
present, feeds the "skipped samples" count. `evaluate(state)` (optional) is called every `schedule.eval_steps`
steps and at the end, on every rank, and returns the metrics to log as `eval/<name>`. `states` are extra objects
with JSON `state_dict()` / `load_state_dict()` carried in the checkpoints (e.g. the best evaluation so far).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ..data.streaming import DataQualityError
from .arguments import UsageError, arguments_dict, check_resumed_arguments, tracker_config
from .checkpoints import CheckpointManager
from .faults import kill_if_requested
from .guards import GracefulExit, NonFiniteLossError, NonFiniteLossGuard
from .meters import WindowMeters
from .optimization import Schedule

__all__ = [
    "StepContext",
    "StepOutput",
    "StepResult",
    "TrainState",
    "TrainingEngine",
    "clip_and_step",
    "optimizer_step",
    "reduce_step_stats",
]

logger = get_logger(__name__)

RATE_UNITS = {"video": ("clips", "clips/s"), "image": ("images", "img/s")}


class ResumableData(Protocol):
    def __iter__(self) -> Any: ...
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


@dataclass(frozen=True)
class StepContext:
    """Where a micro-batch is: `step` optimizer steps are done, this is micro-batch `micro_step` of the next one."""

    step: int
    micro_step: int
    accelerator: Any

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class StepOutput:
    """What a step function returns: the loss to back-propagate and the scalars to log (tensors or floats; the same
    names at every step). They are averaged over the micro-batches of an optimizer step and over ranks, logged as
    `train/<name>`; a "loss" entry also goes to the progress bar."""

    loss: torch.Tensor
    metrics: Mapping[str, torch.Tensor | float]


@dataclass
class StepResult:
    """Outcome of one optimizer step: metrics averaged over micro-batches and ranks (NaN when skipped)."""

    metrics: dict[str, float]
    grad_norm: float
    applied: bool


@dataclass
class TrainState:
    """The loop's counters, carried across checkpoints (`trainer_state.json`).

    `samples` counts the samples of every stream over all ranks; `first_metrics` are those of the first applied
    optimizer step, `last_window` the mean over the last logging window."""

    step: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    first_metrics: dict[str, float] = field(default_factory=dict)
    last_window: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    guard: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    @classmethod
    def from_checkpoint(cls, step: int, extra: Mapping[str, Any], streams: Sequence[str] = ()) -> TrainState:
        fields = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__ and k != "step"}
        state = cls(step=step, **fields)
        if not isinstance(state.samples, dict):  # checkpoints of the earlier fine-tuning loop: one count
            state.samples = {next(iter(streams), "samples"): int(state.samples)}
        return state


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------------------


def reduce_step_stats(accelerator: Any, micro_stats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Average the per-micro-batch statistics of one optimizer step over micro-batches and ranks (collective).

    Returns the mean (non-finite entries of any rank counted as 0) and whether every rank's statistics were finite.
    """
    local = torch.stack(list(micro_stats)).mean(0).to(accelerator.device)
    nonfinite = (~torch.isfinite(local)).any().float().reshape(1)
    reduced = accelerator.reduce(torch.cat([torch.nan_to_num(local, 0.0, 0.0, 0.0), nonfinite]), "sum")
    return reduced[:-1] / accelerator.num_processes, reduced[-1].item() == 0


def clip_and_step(
    accelerator: Any,
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
    and lowers its scale. The gradients are dropped and the schedule advances either way (so `--max_train_steps`
    bounds the run). `max_grad_norm` 0 means no clipping. `clip_grad_norm_` returns no norm under DeepSpeed (it
    clips itself): the norm is then reported as NaN and the step is not counted as non-finite. Returns
    (applied, gradient norm); raises `NonFiniteLossError` (from `guard`) after too many skipped steps in a row.
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


def optimizer_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    guard: NonFiniteLossGuard,
    micro_stats: Sequence[torch.Tensor],
    *,
    names: Sequence[str],
    max_grad_norm: float,
    step: int,
) -> StepResult:
    """Reduce the micro-batches' statistics (`names`, in order) over ranks, then `clip_and_step`: the update is
    skipped on every rank when the loss or gradient norm is NaN/inf on any of them (agreed collectively)."""
    mean, finite = reduce_step_stats(accelerator, micro_stats)
    values = mean.tolist() if finite else [math.nan] * len(names)
    applied, grad_norm = clip_and_step(
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        guard,
        finite=finite,
        max_grad_norm=max_grad_norm,
        step=step,
    )
    if not applied:
        logger.warning(
            f"step {step}: non-finite loss or gradient norm, update skipped ({guard.consecutive} in a row, "
            f"{guard.total_skipped} in total; the run stops at {guard.max_consecutive} in a row)"
        )
    return StepResult(dict(zip(names, values)), grad_norm, applied)


def _format_default(averages: Mapping[str, float]) -> str:
    return " | ".join(f"{name} {value:.4f}" for name, value in averages.items() if name != "grad_norm")


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


class TrainingEngine:
    """Runs `step_fn` over `train_data` until `schedule.max_train_steps` optimizer steps (see the module docstring).

    Args:
        accelerator, model, optimizer: after `accelerator.prepare`.
        lr_scheduler: stepped once per optimizer step (registered for checkpointing here).
        train_data: this rank's infinite, resumable batches.
        args: the script's arguments (the shared groups of `bevt.training.arguments`: `logging_steps`,
            `checkpointing_steps`, `output_dir`, `save_total_limit`, `resume_from_checkpoint`, `max_grad_norm`,
            `max_nonfinite_steps`, `gradient_accumulation_steps`, `with_tracking`).
        schedule: steps in total, per epoch, between evaluations.
        streams: samples per micro-step of each stream on one rank (`{"video": 8, "image": 64}`); the first one
            is shown in the progress bar.
        ema: a `ModelEMA`, updated after every applied step and checkpointed.
        states: extra objects (JSON `state_dict` / `load_state_dict`) saved in every checkpoint.
        project_name: the tracker project (`--with_tracking`: logs under `<output_dir>/<project_name>`).
        desc: the progress bar's label.
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        train_data: ResumableData,
        *,
        args: Any,
        schedule: Schedule,
        streams: Mapping[str, int],
        ema: Any = None,
        states: Mapping[str, Any] | None = None,
        project_name: str = "bevt",
        desc: str = "training",
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_data = train_data
        self.args = args
        self.schedule = schedule
        self.streams = dict(streams)
        self.ema = ema
        self.states = dict(states or {})
        self.project_name = project_name
        self.desc = desc
        self.manager = CheckpointManager(args.output_dir, save_total_limit=args.save_total_limit)
        self.guard = NonFiniteLossGuard(args.max_nonfinite_steps)
        self.state = TrainState(samples={stream: 0 for stream in self.streams})
        self.metric_names: tuple[str, ...] | None = None
        accelerator.register_for_checkpointing(lr_scheduler)
        if ema is not None:
            accelerator.register_for_checkpointing(ema)

    @property
    def samples_per_step(self) -> dict[str, int]:
        """Samples of each stream per optimizer step, all ranks together."""
        factor = self.args.gradient_accumulation_steps * self.accelerator.num_processes
        return {stream: count * factor for stream, count in self.streams.items()}

    # -- checkpoints -------------------------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore `--resume_from_checkpoint` (a folder, or `latest`) on every rank; returns the step to start at.

        `latest` with no checkpoint yet starts fresh (logged), so a pre-emptible job can always pass it."""
        wanted = self.args.resume_from_checkpoint
        if not wanted:
            return 0
        if wanted == "latest" and self.manager.latest() is None:
            logger.info(
                f"--resume_from_checkpoint latest: no checkpoint in {self.args.output_dir} yet, starting from scratch"
            )
            return 0
        try:
            path = self.manager.resolve(wanted)
            resumed = self.manager.load(self.accelerator, path)
            saved_arguments = resumed.extra_state.get("arguments")
            if saved_arguments is not None and dataclasses.is_dataclass(self.args):
                for line in check_resumed_arguments(saved_arguments, arguments_dict(self.args), str(path)):
                    logger.warning(f"resuming {path} with a changed argument: {line}")
            if resumed.data_state is not None:
                self.train_data.load_state_dict(resumed.data_state)
        except (FileNotFoundError, ValueError) as err:  # the messages name the folder and what differs
            message = str(err)
            raise UsageError(
                message
                if "--resume_from_checkpoint" in message
                else f"--resume_from_checkpoint {wanted}: {message}"
            ) from None
        extra = dict(resumed.extra_state)
        self.state = TrainState.from_checkpoint(resumed.step, extra, streams=tuple(self.streams))
        if self.state.guard:
            self.guard.load_state_dict(self.state.guard)
        for name, obj in self.states.items():
            if name in extra.get("states", {}):
                obj.load_state_dict(extra["states"][name])
        logger.info(f"resumed from {path} at step {resumed.step}")
        return resumed.step

    def save_checkpoint(self) -> Path:
        """`checkpoint-<step>` (call on every rank)."""
        self.state.guard = self.guard.state_dict()
        extra = {
            **self.state.to_dict(),
            "states": {name: obj.state_dict() for name, obj in self.states.items()},
        }
        if dataclasses.is_dataclass(self.args):  # compared when the run is resumed (tokens masked)
            extra["arguments"] = arguments_dict(self.args)
        path = self.manager.save(
            self.accelerator, self.state.step, extra_state=extra, data_state=self.train_data.state_dict()
        )
        logger.info(f"saved checkpoint {path}")
        return path

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(
        self,
        step_fn: Callable[[Any, StepContext], StepOutput],
        *,
        evaluate: Callable[[TrainState], Mapping[str, float] | None] | None = None,
        format_metrics: Callable[[Mapping[str, float]], str] = _format_default,
    ) -> int:
        """Train to `schedule.max_train_steps`; returns the exit status: 0; 1 after too many non-finite steps or a
        `DataQualityError` (logged as one `error:` line); 128 + signal number after a signal-triggered checkpoint.

        `format_metrics(averages)` renders the step function's metrics in the log line."""
        if self.args.with_tracking:
            self.accelerator.init_trackers(self.project_name, config=tracker_config(self.args))
        try:
            return self._train(step_fn, evaluate, format_metrics)
        except (NonFiniteLossError, DataQualityError) as err:  # a clear stop, not a traceback
            logger.error(f"error: {err}", main_process_only=False)
            return 1
        finally:
            if self.args.with_tracking:
                self.accelerator.end_training()

    def _train(
        self,
        step_fn: Callable[[Any, StepContext], StepOutput],
        evaluate: Callable[[TrainState], Mapping[str, float] | None] | None,
        format_metrics: Callable[[Mapping[str, float]], str],
    ) -> int:
        accelerator, state, max_steps = self.accelerator, self.state, self.schedule.max_train_steps
        per_step = self.samples_per_step
        meters = WindowMeters.of((), streams=per_step)
        main_stream = next(iter(per_step))
        unit = RATE_UNITS.get(main_stream, (main_stream, f"{main_stream}/s"))[1]
        progress = tqdm(
            total=max_steps,
            initial=state.step,
            desc=self.desc,
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        self.model.train()
        batches = iter(self.train_data)
        micro_stats: list[torch.Tensor] = []
        step_started = time.perf_counter()
        with GracefulExit() as stopper, progress:
            while state.step < max_steps:
                # A DataLoader draws its base seed from the global RNG when it starts: keep that out of the model's
                # random stream (drop path), so a resumed run continues it exactly.
                with meters.timer.phase("data"), torch.random.fork_rng(devices=[]):
                    batch = next(batches)
                with meters.timer.phase("compute"), accelerator.accumulate(self.model):
                    with accelerator.autocast():
                        output = step_fn(batch, StepContext(state.step, len(micro_stats), accelerator))
                    micro_stats.append(self._stack(output.metrics))
                    accelerator.backward(output.loss)
                    if not accelerator.sync_gradients:
                        continue
                    result = optimizer_step(
                        accelerator,
                        self.model,
                        self.optimizer,
                        self.lr_scheduler,
                        self.guard,
                        micro_stats,
                        names=self.metric_names,
                        max_grad_norm=self.args.max_grad_norm,
                        step=state.step + 1,
                    )
                    micro_stats.clear()
                    if self.ema is not None and result.applied:
                        self.ema.update(accelerator.unwrap_model(self.model))

                state.step += 1
                kill_if_requested("step", state.step)  # tests only
                seconds, step_started = time.perf_counter() - step_started, time.perf_counter()
                for stream, count in per_step.items():
                    state.samples[stream] = state.samples.get(stream, 0) + count
                    meters.throughput[stream].update(count, seconds)
                if result.applied:
                    meters.update({**result.metrics, "grad_norm": result.grad_norm})
                    state.first_metrics = state.first_metrics or result.metrics
                progress.update(1)
                postfix = {unit: f"{meters.throughput[main_stream].rate:.1f}"}
                if "loss" in result.metrics:
                    postfix = {"loss": f"{result.metrics['loss']:.3f}", **postfix}
                progress.set_postfix(postfix, refresh=False)
                if state.step % self.args.logging_steps == 0 or state.step == max_steps:
                    self._log(meters, format_metrics)
                if (
                    evaluate is not None
                    and self.schedule.eval_steps
                    and (state.step % self.schedule.eval_steps == 0 or state.step == max_steps)
                ):
                    self._evaluate(evaluate)
                stop = stopper.should_stop(accelerator)
                if stop or (
                    self.args.checkpointing_steps and state.step % self.args.checkpointing_steps == 0
                ):
                    self.save_checkpoint()
                if stop:
                    logger.warning(
                        f"{stopper.describe()}: checkpoint saved at step {state.step}; continue with "
                        "--resume_from_checkpoint latest"
                    )
                    return stopper.exit_code
        if evaluate is not None and state.last_eval_step != state.step:
            self._evaluate(evaluate)
        check_replicas(accelerator, self.model)
        return 0

    def _stack(self, metrics: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """The step function's scalars as one float32 vector, in a fixed order."""
        names = tuple(metrics)
        if self.metric_names is None:
            self.metric_names = names
        elif names != self.metric_names:
            raise ValueError(
                f"the step function returned the metrics {list(names)}, earlier {list(self.metric_names)}: return the "
                "same names at every step (0 for an absent value)"
            )
        device = self.accelerator.device
        return torch.stack(
            [
                torch.as_tensor(v, device=device).detach().to(torch.float32).reshape(())
                for v in metrics.values()
            ]
        )

    def _evaluate(self, evaluate: Callable[[TrainState], Mapping[str, float] | None]) -> None:
        metrics = evaluate(self.state)
        self.state.last_eval_step = self.state.step
        if self.args.with_tracking and metrics:
            self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.step)

    def skipped_samples(self) -> dict[str, int]:
        """Samples the data layer skipped so far per stream, summed over ranks (collective: call on every rank)."""
        counts_of = getattr(self.train_data, "skipped_counts", None)
        if counts_of is None:
            return {}
        local = counts_of()
        counts = torch.tensor([float(v) for v in local.values()], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, "sum")
        return {kind: int(v) for kind, v in zip(local, counts.tolist())}

    def _log(self, meters: WindowMeters, format_metrics: Callable[[Mapping[str, float]], str]) -> None:
        """One log line on the main process and, with --with_tracking, the tracker scalars; resets the window."""
        state = self.state
        skipped = self.skipped_samples()  # collective: every rank calls it
        averages = meters.averages()
        timing = meters.timer.averages()
        rates = {stream: meter.rate for stream, meter in meters.throughput.items()}
        lr = max(self.lr_scheduler.get_last_lr())
        epoch = self.schedule.epoch(state.step)
        if not math.isnan(averages.get("loss", math.nan)):
            state.last_window = {name: averages[name] for name in self.metric_names or ()}
            rate_text = ", ".join(
                f"{rate:.1f} {RATE_UNITS.get(stream, (stream + 's',))[0]}/s" for stream, rate in rates.items()
            )
            epoch_text = f" (epoch {epoch:.2f})" if epoch is not None else ""
            logger.info(
                f"step {state.step}/{self.schedule.max_train_steps}{epoch_text} | {format_metrics(averages)} | "
                f"lr {lr:.2e} | grad norm {averages.get('grad_norm', math.nan):.2f} | {rate_text} | data "
                f"{timing.get('data', 0):.3f}s, compute {timing.get('compute', 0):.3f}s per micro-step | skipped "
                f"samples {sum(skipped.values())}"
            )
        if self.args.with_tracking:
            values: dict[str, float] = {f"train/{name}": v for name, v in meters.finite(averages).items()}
            values["train/lr"] = lr
            values["train/nonfinite_steps_skipped"] = self.guard.total_skipped
            if epoch is not None:
                values["train/epoch"] = epoch
            values.update({f"time/{phase}_seconds_per_micro_step": v for phase, v in timing.items()})
            values.update({f"throughput/{stream}_per_second": rate for stream, rate in rates.items()})
            values.update({f"data/{stream}_samples_skipped": count for stream, count in skipped.items()})
            values.update({f"data/{stream}_samples_seen": state.samples.get(stream, 0) for stream in rates})
            self.accelerator.log(values, step=state.step)
        meters.reset()

    # -- the end -----------------------------------------------------------------------------------------------

    def summary(self, title: str, names: Iterable[str] | None = None, extra_lines: Iterable[str] = ()) -> str:
        """The end-of-run text: how each metric moved (first step -> mean of the last logging window), then
        `extra_lines` and where the model is."""
        first, last = self.state.first_metrics, self.state.last_window
        names = list(names if names is not None else (self.metric_names or first))
        moves = [f"  {n:<20} {first.get(n, math.nan):.4f} -> {last.get(n, math.nan):.4f}" for n in names]
        lines = [
            f"\n{title}: {self.state.step} steps (first step -> mean of the last {self.args.logging_steps}):",
            *moves,
            *extra_lines,
            f"Model saved to {self.args.output_dir}",
        ]
        return "\n".join(lines)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of `model` (names, shapes, dtypes and bytes), as hex."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas(accelerator: Any, model: torch.nn.Module) -> list[str] | None:
    """At the end of a data-parallel run (DDP, one or many machines) every rank should hold the same weights: each
    rank logs the digest of its own copy, the main process compares them all and warns if any differs. Returns the
    digests (by rank); None when not applicable (one process, or sharded FSDP / DeepSpeed weights)."""
    from accelerate.utils import gather_object

    # DDP on any device type (MULTI_CPU, MULTI_GPU, ...): every rank holds the whole model
    replicated = str(getattr(accelerator.distributed_type, "value", "")).startswith("MULTI_")
    if accelerator.num_processes < 2 or not replicated:
        return None
    own = weights_digest(accelerator.unwrap_model(model))
    logger.info(f"final weights of rank {accelerator.process_index}: sha256 {own}", main_process_only=False)
    digests = gather_object([own])
    if len(set(digests)) == 1:
        logger.info(f"final weights identical on all {len(digests)} ranks (sha256 {own[:16]})")
    else:
        logger.warning(f"final weights DIFFER between ranks: {dict(enumerate(digests))}")
    return digests
