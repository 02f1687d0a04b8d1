"""The training engine driven by a step that is neither pretraining nor classification (as the coming tokenizer
training script will): an arguments class made of the shared groups, gradient accumulation, the evaluation and
checkpoint cadence, exact resume of the loop's counters and registered states, the summary; signals agreed across
ranks (`Accelerator.set_trigger/check_trigger`) with 128 + signal as exit status, also on a rank that got none."""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator

from bevt.training import (
    BEVTArgumentParser,
    GracefulExit,
    StepContext,
    StepOutput,
    TrainingEngine,
    build_lr_scheduler,
    build_optimizer,
    frequent_evaluation_warning,
    resolve_schedule,
)
from bevt.training.arguments import (
    CheckpointArguments,
    OptimizerArguments,
    RunControlArguments,
    ScheduleArguments,
    TrackingArguments,
    UsageError,
)

WEIGHTS = torch.tensor([[1.0], [-2.0], [0.5]])


@dataclass
class ToyArguments(ScheduleArguments, OptimizerArguments, CheckpointArguments, TrackingArguments, RunControlArguments):
    """A third script's arguments: only shared groups."""


class RegressionBatches:
    """Infinite, exactly resumable batches of a linear regression problem (batch i is seeded by i)."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(self.position)
            x = torch.randn(4, 3, generator=generator)
            self.position += 1
            yield {"x": x, "y": x @ WEIGHTS}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class Evaluations:
    """A registered state (saved in checkpoints) and the evaluation hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.steps = model, []

    def __call__(self, state) -> dict[str, float]:
        self.steps.append(state.step)
        with torch.no_grad():
            return {"weight_error": float((self.model.weight.T - WEIGHTS).abs().max())}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])


def _train(output_dir, resume: str | None = None, max_steps: int = 6, extra: tuple[str, ...] = ()):
    argv = ["--output_dir", str(output_dir), "--learning_rate", "0.4", "--weight_decay", "0", "--max_grad_norm", "0",
            "--gradient_accumulation_steps", "2", "--max_train_steps", str(max_steps), "--checkpointing_steps", "3",
            "--logging_steps", "2", "--lr_scheduler_type", "constant_with_warmup"]  # fmt: skip
    if resume:
        argv += ["--resume_from_checkpoint", resume]
    args = BEVTArgumentParser(ToyArguments).parse([*argv, *extra])  # a repeated flag: the last one wins
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.gradient_accumulation_steps)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    schedule = resolve_schedule(
        samples_per_epoch=None, samples_per_step=8, max_train_steps=args.max_train_steps, num_train_epochs=None,
        eval_steps=2,
    )  # fmt: skip
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(args, optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = RegressionBatches()
    evaluations = Evaluations(accelerator.unwrap_model(model))
    micro_steps: list[tuple[int, int]] = []

    def step(batch: dict, context: StepContext) -> StepOutput:
        micro_steps.append((context.step, context.micro_step))
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return StepOutput(loss, {"loss": loss, "batch_mean": batch["x"].mean()})

    engine = TrainingEngine(
        accelerator, model, optimizer, lr_scheduler, data, args=args, schedule=schedule, streams={"image": 4},
        states={"evaluations": evaluations}, project_name="toy",
    )  # fmt: skip
    start = engine.resume()
    code = engine.run(step, evaluate=evaluations)
    return code, start, engine, evaluations, micro_steps, data


def test_engine_drives_any_step_and_resumes_exactly(tmp_path):
    code, start, engine, evaluations, micro_steps, data = _train(tmp_path / "straight")
    assert code == 0 and start == 0 and engine.state.step == 6
    assert micro_steps == [(s, m) for s in range(6) for m in (0, 1)]  # accumulation 2: two micro-batches a step
    assert data.position == 12 and engine.state.samples == {"image": 6 * 2 * 4}
    assert evaluations.steps == [2, 4, 6]  # every 2 steps, the last one not again at the end
    assert engine.state.last_eval_step == 6
    first, last = engine.state.first_metrics, engine.state.last_window
    assert set(first) == {"loss", "batch_mean"} and last["loss"] < first["loss"] / 4  # it learns
    summary = engine.summary("Toy training done")
    assert "Toy training done: 6 steps (first step -> mean of the last 2):" in summary
    assert f"  loss                 {first['loss']:.4f} -> {last['loss']:.4f}" in summary
    weights = engine.accelerator.unwrap_model(engine.model).weight.detach().clone()
    assert [p.name for p in engine.manager.checkpoints()] == ["checkpoint-3", "checkpoint-6"]

    # resume from checkpoint-3: the same weights, counters, data position and registered state
    resumed_dir = tmp_path / "resumed"
    code, start, engine, evaluations, micro_steps, data = _train(
        resumed_dir, resume=str(tmp_path / "straight" / "checkpoint-3")
    )
    assert code == 0 and start == 3 and micro_steps[0] == (3, 0)
    assert data.position == 12 and evaluations.steps == [2, 4, 6]
    assert engine.state.first_metrics == first  # carried over, not re-measured
    assert torch.equal(engine.accelerator.unwrap_model(engine.model).weight, weights)


def test_step_metrics_must_keep_their_names(tmp_path):
    args = BEVTArgumentParser(ToyArguments).parse(
        ["--output_dir", str(tmp_path), "--learning_rate", "0.1", "--weight_decay", "0", "--max_grad_norm", "0",
         "--gradient_accumulation_steps", "1", "--max_train_steps", "3", "--checkpointing_steps", "0",
         "--logging_steps", "1"]
    )  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model, args)
    schedule = resolve_schedule(samples_per_epoch=None, samples_per_step=4, max_train_steps=3, num_train_epochs=None)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = TrainingEngine(
        accelerator, model, optimizer, build_lr_scheduler(args, optimizer, schedule), RegressionBatches(),
        args=args, schedule=schedule, streams={"image": 4},
    )  # fmt: skip
    calls = []

    def step(batch: dict, context: StepContext) -> StepOutput:
        calls.append(context.step)
        loss = model(batch["x"]).pow(2).mean()
        return StepOutput(loss, {"loss": loss} if context.step == 0 else {"mse": loss})

    with pytest.raises(ValueError, match=r"returned the metrics \['mse'\], earlier \['loss'\]"):
        engine.run(step)
    assert calls == [0, 1]


class _Ranks:
    """An accelerator stand-in for the stop agreement: another rank set the trigger."""

    def __init__(self, other_rank_triggered: bool) -> None:
        self.triggered, self.other = False, other_rank_triggered

    def set_trigger(self) -> None:
        self.triggered = True

    def check_trigger(self) -> bool:
        return self.triggered or self.other


def test_stop_signal_is_agreed_through_the_accelerator_trigger():
    with GracefulExit() as stopper:
        ranks = _Ranks(other_rank_triggered=False)
        assert not stopper.should_stop(ranks)
        signal.raise_signal(signal.SIGINT)  # the first SIGINT is a stop request, not a KeyboardInterrupt
        assert stopper.should_stop(ranks) and ranks.triggered
        assert stopper.exit_code == 128 + signal.SIGINT and stopper.describe() == "received signal 2"
    with GracefulExit() as bystander:  # this rank got nothing; another rank did
        assert bystander.should_stop(_Ranks(other_rank_triggered=True))
        assert bystander.exit_code == 128 + signal.SIGTERM
        assert bystander.describe() == "another rank received a stop signal"


def test_resume_refuses_changed_hyperparameters_and_names_them(tmp_path, caplog):
    """Issue 17: a resumed run silently ignored a changed --learning_rate (identical losses). The checkpoint keeps the
    run's arguments; batch sizes, lr, schedule, seed and model may not change (an error naming each, both values),
    steps / logging / checkpointing may (nothing said), anything else is taken with a warning naming it."""
    _train(tmp_path / "run", max_steps=3)
    checkpoint = str(tmp_path / "run" / "checkpoint-3")
    with pytest.raises(UsageError) as info:
        _train(tmp_path / "a", resume=checkpoint, extra=("--learning_rate", "0.01", "--lr_scheduler_type", "cosine"))  # fmt: skip
    message = str(info.value)
    assert message.startswith(f"error: --resume_from_checkpoint {checkpoint}: the run was saved with other")
    assert "--learning_rate 0.4 -> 0.01" in message
    assert "--lr_scheduler_type 'constant_with_warmup' -> 'cosine'" in message
    with pytest.raises(UsageError, match=r"--gradient_accumulation_steps 2 -> 1"):
        _train(tmp_path / "b", resume=checkpoint, extra=("--gradient_accumulation_steps", "1"))

    # more steps, other logging: fine; another clipping norm: taken, with a warning
    extra = ("--logging_steps", "1", "--max_grad_norm", "1.0")
    with caplog.at_level("WARNING"):
        code, start, engine, *_ = _train(tmp_path / "c", resume=checkpoint, max_steps=5, extra=extra)
    assert code == 0 and start == 3 and engine.state.step == 5
    changed = [r.getMessage() for r in caplog.records if "changed argument" in r.getMessage()]
    assert len(changed) == 1, changed
    assert changed[0].endswith(f"resuming {checkpoint} with a changed argument: --max_grad_norm 0.0 -> 1.0")


def test_an_epoch_cadence_on_a_tiny_subset_warns_of_its_many_evaluations():
    """30 labeled clips, 16 a step: 2-step epochs; `--eval_every_epochs 1` over 240 steps evaluates 120 times (the
    low-label demo chain's trap): warned, naming --eval_steps. A chosen --eval_steps, or a normal run, is not."""
    tiny = resolve_schedule(
        samples_per_epoch=30, samples_per_step=16, max_train_steps=240, num_train_epochs=None, eval_every_epochs=1.0
    )
    assert (tiny.steps_per_epoch, tiny.eval_steps, tiny.num_evaluations) == (2, 2, 120)
    warning = frequent_evaluation_warning(tiny, eval_steps_given=False)
    assert warning is not None and "120 evaluations in 240 steps" in warning and "--eval_steps" in warning
    assert frequent_evaluation_warning(tiny, eval_steps_given=True) is None  # the user asked for it
    normal = resolve_schedule(
        samples_per_epoch=9600, samples_per_step=64, max_train_steps=None, num_train_epochs=30, eval_every_epochs=1.0
    )
    assert (normal.max_train_steps, normal.num_evaluations) == (4500, 30)
    assert frequent_evaluation_warning(normal, eval_steps_given=False) is None
    uneven = resolve_schedule(samples_per_epoch=None, samples_per_step=4, max_train_steps=10, num_train_epochs=None, eval_steps=4)
    assert uneven.num_evaluations == 3  # steps 4, 8 and the end (10)
    at_end = resolve_schedule(samples_per_epoch=None, samples_per_step=4, max_train_steps=10, num_train_epochs=None)
    assert at_end.num_evaluations == 1
