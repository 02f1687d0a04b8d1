#!/usr/bin/env python
"""Fine-tune BEVT for video classification with 🤗 Accelerate, evaluate it with multi-view testing, export it.

    accelerate launch run_finetuning.py                       # built-in demo: tiny model, synthetic shards
    accelerate launch run_finetuning.py --recipe k400 --model_name_or_path bevt-pretrained \\
        --train_shards "k400/train/*.tar" --validation_shards k400/val --label_names k400/labels.txt
    accelerate launch run_finetuning.py --recipe ssv2 --model_name_or_path bevt-pretrained \\
        --train_shards ssv2/train --validation_shards ssv2/val --label_names ssv2/labels.txt
    accelerate launch run_finetuning.py --do_eval_only --model_name_or_path bevt-finetuned-k400 \\
        --validation_shards k400/val --output_dir k400-eval
    accelerate launch run_finetuning.py --config run.yaml     # flags from a file (the command line wins)

Start from a BEVT folder (`run_pretraining.py` output, a checkpoint converted with `python -m bevt.convert`, an
earlier fine-tuning run) or from scratch (`--model_preset`). A folder's model keeps its window, frames per clip,
image size and drop path unless a flag changes them (the recipes change only what the official recipe changes in
the official pretraining: 16 -> 32 frames; ssv2 also 8x7x7 -> 16x7x7 and drop path 0.3 -> 0.4). `--recipe` sets
the official defaults of a dataset (k400, ssv2; diving48 is the ssv2 recipe for Diving48's 48 classes; the README
has the table and `--help` every value); every flag still overrides them.

The output folder is Hub-ready: config with `id2label`, safetensors weights (EMA weights when `--ema_decay` is set),
a `BEVTVideoProcessor`, the modeling code + `auto_map` (loads with `trust_remote_code=True`), `eval_results.json`,
`confusion_matrix.png`, `training_results.json` (training loss / accuracy of the first step and the last logging
window) and a model card `README.md` with the results in `model-index`. It holds the best evaluated weights
(`--final_model best`, default) or the last ones. The flags and recipes: `bevt.training.finetuning_arguments`;
the loop: `bevt.training.TrainingEngine` (this script gives it `finetuning_step`).
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from bevt import BEVTConfig, BEVTForVideoClassification
from bevt.data.streaming import StreamDataLoader, build_stream, counted_examples
from bevt.data.subsets import write_training_subset
from bevt.data.transforms import VideoClassificationTrainTransform, mixup_cutmix, seeded_generator
from bevt.finetuning import (
    Exporter,
    Shards,
    check_shards_exist,
    dataset_name_from_shards,
    freeze_backbone,
    freeze_unused_video_parameters,
    load_model_for_finetuning,
    resolve_label_names,
    training_accuracy,
)
from bevt.training import (
    BEVTArgumentParser,
    ModelEMA,
    Schedule,
    StepContext,
    StepOutput,
    TrainingEngine,
    TrainState,
    build_lr_scheduler,
    build_optimizer,
    fail,
    frequent_evaluation_warning,
    layer_decay_lr_scale,
    resolve_schedule,
)
from bevt.training.arguments import UsageError, check_loaded_weights, load_error, parse_config_overrides
from bevt.training.evaluation import MultiViewEvaluator, is_better, write_eval_outputs, write_json
from bevt.training.finetuning_arguments import METRICS, FinetuningArguments
from bevt.training.runtime import (
    HUB_IGNORE_PATTERNS,
    compile_encoder,
    push_to_hub,
    run_script,
    start_run,
    write_demo_data_once,
)

logger = get_logger(__name__)

TRACKER_PROJECT = "bevt_finetuning"  # Accelerate tracker project: logs under <output_dir>/bevt_finetuning


def parse_args(argv: list[str] | None = None) -> FinetuningArguments:
    """Parse `--config` and the command line, fill the recipe (or demo) defaults, resolve the architecture of a
    `--model_name_or_path` folder, and check every value. `--help` shows the k400 / ssv2 / diving48 / demo defaults."""
    parser = BEVTArgumentParser(
        FinetuningArguments,
        description="Fine-tune BEVT for video classification with Accelerate. Without --train_shards (and "
        "without --do_eval_only), runs the built-in demo on synthetic temporal-reasoning data.",
    )
    return parser.parse(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data, labels, model
# ---------------------------------------------------------------------------------------------------------------


def data_shards(args: FinetuningArguments, accelerator: Accelerator) -> Shards:
    """The flags' shards, or the demo's (written once under `<output_dir>/demo_data`). Without `--dataset_name`, the
    card's dataset is the one the shards' `dataset_info.json` records (`make_shards --dataset-name`), if any."""
    if not args.demo:
        flags = {"--train_shards": args.train_shards, "--validation_shards": args.validation_shards}
        storage_options = args.stream_options()["storage_options"]
        check_shards_exist(flags, storage_options)
        if not args.dataset_name:
            args.dataset_name = dataset_name_from_shards(list(flags.values()), storage_options)
        return Shards(args.train_shards, args.validation_shards, args.label_names)
    from bevt.data.demo_finetuning import write_demo_shards

    logger.info(
        "No --train_shards given: running the built-in demo (synthetic temporal classes, tiny model)."
    )
    demo = write_demo_data_once(accelerator, Path(args.output_dir) / "demo_data", write_demo_shards)
    return Shards(demo.train_shards, demo.validation_shards, args.label_names or demo.label_names_file)


def build_model(args: FinetuningArguments, label_names: list[str]) -> BEVTForVideoClassification:
    """From --model_name_or_path (any BEVT folder; window resized when it differs) or from scratch."""
    if args.model_name_or_path:
        try:
            model, report = load_model_for_finetuning(
                args.model_name_or_path, label_names, **args.model_updates()
            )
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise load_error("--model_name_or_path", args.model_name_or_path, err) from None
        logger.info(f"Model: {report.describe()}")
        for choice in args.architecture.values():
            if choice.changed:
                log = logger.warning if choice.origin == "flag" else logger.info
                log(f"Architecture change: {choice.describe()}")
        for line in args.skipped_recipe_changes:
            logger.info(line)
    else:
        labels = {
            "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)},
        }
        try:
            config = BEVTConfig.from_preset(
                args.model_preset,
                **{**args.model_updates(), **parse_config_overrides(args.config_overrides)},
                num_labels=len(label_names),
                **labels,
            )
        except (TypeError, ValueError) as err:
            raise UsageError(f"--model_preset/--config_overrides give an invalid config: {err}") from None
        model = BEVTForVideoClassification(config)
        frozen = freeze_unused_video_parameters(model)
        logger.info(
            f"Model: new {args.model_preset} model from scratch ({len(frozen)} unused image-stream tensors frozen)"
        )
    if args.frozen_backbone:
        count = freeze_backbone(model, batchnorm=args.linear_probe)
        logger.info(f"Protocol: {args.protocol}; {count} backbone tensors frozen, the backbone runs in eval mode")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def training_subset(args: FinetuningArguments, accelerator: Accelerator, shards: list[str]) -> list[str]:
    """--max_train_samples / --train_fraction: a fixed, seeded, class-balanced subset of the training clips, written
    once to `<output_dir>/train_subset` (one shard per rank) and reused by every rank and by resumed runs."""
    sizes = {"size": args.max_train_samples, "fraction": args.train_fraction}

    def write(folder: Path):
        try:
            return write_training_subset(shards, folder, **sizes, seed=args.seed, num_shards=accelerator.num_processes)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--max_train_samples / --train_fraction: {err}") from None

    subset = write_demo_data_once(accelerator, Path(args.output_dir) / "train_subset", write, "training subset")
    logger.info(f"Training subset: {subset.describe()}")
    return subset.shards


def build_train_loader(
    args: FinetuningArguments, accelerator: Accelerator, shards: list[str]
) -> StreamDataLoader:
    """This rank's infinite, resumable stream of augmented training clips (page-locked batches on CUDA)."""
    transform = VideoClassificationTrainTransform(
        image_size=args.image_size,
        short_side=args.short_side,
        area_range=args.crop_scale,
        flip_prob=args.flip_prob,
        randaug=args.randaug,
        random_erasing=args.random_erasing,
    )
    try:
        stream = build_stream(
            shards,
            kind="video",
            transform=transform,
            clip_len=args.num_frames,
            frame_interval=args.frame_interval,
            sampling=args.sampling,
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            repeat=True,
            require_label=True,
            **args.stream_options(),
        )
    except (OSError, ValueError, ImportError) as err:  # missing files, unreachable URLs, a missing fsspec backend
        raise UsageError(f"--train_shards: {err}") from None
    return StreamDataLoader(
        stream,
        args.per_device_train_batch_size,
        num_workers=args.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),  # asynchronous host-to-GPU copies
    )


def build_evaluator(
    args: FinetuningArguments, accelerator: Accelerator, shards: list[str], label_names: list[str]
) -> MultiViewEvaluator:
    return MultiViewEvaluator(
        accelerator,
        shards,
        label_names,
        args.video_processor(args.eval_short_side, args.eval_num_crops),
        num_clips=args.eval_num_clips,
        num_crops=args.eval_num_crops,
        clip_len=args.num_frames,
        frame_interval=args.frame_interval,
        sampling=args.sampling,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        max_views_per_forward=args.max_eval_views_per_forward,
        details={"image_size": args.image_size, "eval_short_side": args.eval_short_side},
        stream_options=args.stream_options(),
    )


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


def finetuning_step(args: FinetuningArguments, model: torch.nn.Module, num_labels: int):
    """The engine's step: the batch to the device, then mixup / cutmix / label smoothing there (soft targets
    `(B, num_labels)`, seeded per step, micro-batch and rank), then the classification loss."""
    soft_targets = args.mixup > 0 or args.cutmix > 0 or args.label_smoothing > 0

    def step(batch: dict[str, Any], context: StepContext) -> StepOutput:
        if args.frozen_backbone:  # features from the backbone in eval mode (the engine puts the model in train mode)
            context.accelerator.unwrap_model(model).bevt.eval()
        pixel_values = batch["pixel_values"].to(context.device, non_blocking=True)
        labels = batch["labels"].to(context.device, non_blocking=True)
        targets = labels
        if soft_targets:
            rank = context.accelerator.process_index
            generator = seeded_generator(args.seed, "mix", context.step, context.micro_step, rank)
            pixel_values, targets = mixup_cutmix(
                pixel_values, labels, num_labels, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                label_smoothing=args.label_smoothing, generator=generator,
            )  # fmt: skip
        output = model(pixel_values=pixel_values, labels=targets)
        accuracy = training_accuracy(output.logits, targets)  # mixed clips: against their dominant class
        return StepOutput(output.loss, {"loss": output.loss, "accuracy": accuracy})

    return step


def format_metrics(metrics: dict[str, float]) -> str:
    return f"loss {metrics['loss']:.4f} | train acc {metrics['accuracy']:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation during training, export
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ValidationDuringTraining:
    """The engine's `evaluate` hook: scores the EMA (or raw) weights, keeps the history (`eval_history.json`) and
    exports the best evaluation as soon as it is reached; checkpointed with the run (a registered state)."""

    args: FinetuningArguments
    accelerator: Accelerator
    model: torch.nn.Module
    ema: ModelEMA | None
    evaluator: MultiViewEvaluator
    exporter: Exporter
    schedule: Schedule
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def state_dict(self) -> dict[str, Any]:
        keys = ("best_metric", "best_step", "best_metrics", "history")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    def __call__(self, state: TrainState) -> dict[str, float]:
        args, accelerator, is_main = self.args, self.accelerator, self.accelerator.is_main_process
        metrics, predictions = self.evaluator.run(self.eval_model())
        epoch = self.schedule.epoch(state.step)
        elapsed = round(time.perf_counter() - self.started, 1)  # seconds since this process started training
        self.history.append({"step": state.step, "epoch": epoch, "elapsed_s": elapsed, **metrics})
        if is_main:
            self.exporter.last_report = self.evaluator.report(
                predictions,
                metrics,
                model=args.output_dir,
                step=state.step,
                epoch=epoch,
                ema=self.ema is not None,
            )
        value = metrics[args.metric_for_best_model]
        if args.final_model == "best" and is_better(value, self.best_metric):
            self.best_metric, self.best_step, self.best_metrics = value, state.step, metrics
            if is_main:
                self.exporter.export(self.eval_model(), metrics, self.exporter.last_report)
                logger.info(
                    f"new best {args.metric_for_best_model} {100 * value:.2f}%: exported to {args.output_dir}"
                )
            accelerator.wait_for_everyone()
        if is_main:
            write_json(Path(args.output_dir) / "eval_history.json", self.history)
        return metrics


def evaluate_only(args: FinetuningArguments, accelerator: Accelerator) -> int:
    """Evaluate --model_name_or_path on --validation_shards; write the JSON report and the confusion matrix."""
    storage_options = args.stream_options()["storage_options"]
    check_shards_exist({"--validation_shards": args.validation_shards}, storage_options)
    try:
        model, info = BEVTForVideoClassification.from_pretrained(
            args.model_name_or_path, output_loading_info=True
        )
        check_loaded_weights(model, info)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise load_error("--model_name_or_path", args.model_name_or_path, err) from None
    label_names = resolve_label_names(
        args, Shards(None, args.validation_shards, args.label_names), model.config
    )
    if len(label_names) != model.config.num_labels:
        fail("--label_names", f"{model.config.num_labels} names (the model's classes)", len(label_names))
    model.to(accelerator.device)
    evaluator = build_evaluator(args, accelerator, args.validation_shards, label_names)
    metrics, predictions = evaluator.run(model)
    if accelerator.is_main_process:
        report = evaluator.report(predictions, metrics, model=str(args.model_name_or_path))
        write_eval_outputs(args.output_dir, report, label_names, Path(args.model_name_or_path).name)
        print(
            f"\nEvaluation of {args.model_name_or_path} on {len(predictions)} videos "
            f"({args.eval_num_clips} clips x {args.eval_num_crops} crops): "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items())
            + f"\nReport: {Path(args.output_dir) / 'eval_results.json'}, {Path(args.output_dir) / 'confusion_matrix.png'}",
            flush=True,
        )
    accelerator.wait_for_everyone()
    return 0


def exported_model(
    args: FinetuningArguments, engine: TrainingEngine, validation: ValidationDuringTraining | None
) -> tuple[str, int]:
    """Which weights the folder holds at the end, and their step: ("best", step) when the best evaluation was
    exported (`--final_model best` and something evaluated), else ("last", the final step)."""
    if validation is not None and args.final_model == "best" and validation.best_step is not None:
        return "best", validation.best_step
    return "last", engine.state.step


def export_final(
    engine: TrainingEngine, validation: ValidationDuringTraining | None, exporter: Exporter
) -> dict | None:
    """Export the last weights unless the best ones are already exported; returns the exported model's metrics."""
    args, accelerator = exporter.args, engine.accelerator
    accelerator.wait_for_everyone()
    if exported_model(args, engine, validation)[0] == "best":
        return validation.best_metrics
    final = engine.ema.module if engine.ema is not None else accelerator.unwrap_model(engine.model)
    last = validation.history[-1] if validation and validation.history else None
    metrics = (
        {k: v for k, v in last.items() if k in METRICS}
        if last and last["step"] == engine.state.step
        else None
    )
    if accelerator.is_main_process:
        exporter.export(final, metrics, exporter.last_report if metrics else None)
    accelerator.wait_for_everyone()
    return metrics


def write_training_results(
    args: FinetuningArguments,
    engine: TrainingEngine,
    validation: ValidationDuringTraining | None,
    final_metrics: dict[str, float] | None,
) -> Path:
    """`<output_dir>/training_results.json` (main process): steps, clips seen, the first step's and the last logging
    window's training loss and accuracy (how well the training clips are fitted: beside the validation metrics, the
    generalisation gap of a low-label run), which model was exported and its validation metrics."""
    state = engine.state

    def finite(metrics: dict[str, float]) -> dict[str, float | None]:
        return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}

    chosen, step = exported_model(args, engine, validation)
    results = {
        "steps": state.step,
        "samples": dict(state.samples),
        "first": finite(state.first_metrics),
        "final_window": finite(state.last_window),
        "logging_steps": args.logging_steps,
        "mode": "linear_probe" if args.linear_probe else "freeze_backbone" if args.freeze_backbone else "full",
        "max_train_samples": args.max_train_samples,
        "train_fraction": args.train_fraction,
        "exported_model": chosen,
        "exported_step": step,
        "validation": final_metrics or None,
    }
    return write_json(Path(args.output_dir, "training_results.json"), results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = start_run(args, quiet_accelerate=False)
    if args.do_eval_only:
        return evaluate_only(args, accelerator)
    shards = data_shards(args, accelerator)
    if args.max_train_samples or args.train_fraction:
        shards.train = training_subset(args, accelerator, shards.train)
    set_seed(args.seed)  # the same initial weights on every rank

    label_names = resolve_label_names(args, shards)
    model = build_model(args, label_names)
    loader = build_train_loader(args, accelerator, shards.train)
    evaluator = (
        build_evaluator(args, accelerator, shards.validation, label_names) if shards.validation else None
    )
    per_step = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    schedule = resolve_schedule(
        samples_per_epoch=counted_examples(loader.stream)
        if args.max_train_steps is None or args.eval_steps is None
        else loader.stream.total_examples,
        samples_per_step=per_step,
        max_train_steps=args.max_train_steps,
        num_train_epochs=args.num_train_epochs,
        num_warmup_steps=args.num_warmup_steps,
        warmup_epochs=args.warmup_epochs,
        eval_steps=args.eval_steps,
        eval_every_epochs=args.eval_every_epochs,
    )
    scale = layer_decay_lr_scale(model.config.depths, args.layer_decay, args.backbone_lr_multiplier)
    optimizer = build_optimizer(model, args, lr_scale=scale)
    lr_scheduler = build_lr_scheduler(args, optimizer, schedule)
    ema = ModelEMA(model, args.ema_decay) if args.ema_decay else None
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:
        compile_encoder(accelerator.unwrap_model(model))
    if ema is not None:
        ema.to(accelerator.device)

    exporter = Exporter(args, label_names, evaluator.num_views if evaluator else None)
    exporter.hyperparameters = args.card_hyperparameters(schedule, accelerator.num_processes)
    validation = None
    if evaluator is not None:
        validation = ValidationDuringTraining(args, accelerator, model, ema, evaluator, exporter, schedule)
    engine = TrainingEngine(
        accelerator, model, optimizer, lr_scheduler, loader, args=args, schedule=schedule,
        streams={"video": args.per_device_train_batch_size}, ema=ema,
        states={"validation": validation} if validation else None, project_name=TRACKER_PROJECT, desc="fine-tuning",
    )  # fmt: skip
    engine.resume()
    unwrapped = accelerator.unwrap_model(model)
    logger.info(
        f"***** Fine-tuning{' (demo)' if args.demo else ''} *****\n"
        f"  model: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, {len(label_names)} classes, "
        f"window {'x'.join(map(str, unwrapped.config.window_size))}, {args.num_frames} frames at {args.image_size} px\n"
        f"  data: {loader.stream.total_examples or '?'} training clips, {per_step} per optimizer step; "
        f"{schedule.steps_per_epoch or '?'} steps per epoch\n"
        f"  steps: {schedule.max_train_steps} (warmup {schedule.num_warmup_steps}), evaluation every "
        f"{schedule.eval_steps or 'end'} steps, starting at {engine.state.step}"
    )
    if validation is not None and (warning := frequent_evaluation_warning(schedule, args.eval_steps is not None)):
        logger.warning(warning)
    exit_code = engine.run(
        finetuning_step(args, model, len(label_names)), evaluate=validation, format_metrics=format_metrics
    )
    if exit_code == 0:
        final_metrics = export_final(engine, validation, exporter)
        if accelerator.is_main_process:
            write_training_results(args, engine, validation, final_metrics)
            lines = []
            if final_metrics:
                chosen, step = exported_model(args, engine, validation)
                lines.append(
                    f"Validation ({chosen} model, step {step}): "
                    + ", ".join(f"{k} {100 * v:.2f}%" for k, v in final_metrics.items())
                )
                lines.append(f"validation accuracy: {100 * final_metrics['top1_accuracy']:.2f}%")
            print(engine.summary("Fine-tuning done", ("loss", "accuracy"), lines), flush=True)
            if args.push_to_hub:
                push_to_hub(
                    args,
                    commit_message="BEVT fine-tuning: model, video processor, evaluation results",
                    ignore_patterns=(*HUB_IGNORE_PATTERNS, f"{TRACKER_PROJECT}/*"),
                )
    return exit_code


if __name__ == "__main__":
    run_script(main)
