#!/usr/bin/env python
"""BEVT pretraining (masked image + masked video modeling) with 🤗 Accelerate.

    accelerate launch run_pretraining.py                      # built-in demo: tiny model, synthetic shards, pixels
    accelerate launch run_pretraining.py --stage image --image_shards "imagenet/train-*.tar" ...
    accelerate launch run_pretraining.py --stage joint --model_name_or_path stage1_output \\
        --video_shards "k400/train-*.tar" --image_shards "imagenet/train-*.tar" \\
        --tokenizer_name_or_path dall-e-tokenizer --output_dir bevt-base-pretrained
    accelerate launch run_pretraining.py --config run.yaml    # flags from a file (the command line wins)

Stage 1 (`--stage image`) trains the encoder on masked image modeling only; stage 2 (`--stage joint`) feeds one
image batch and one video batch through the shared encoder at every step, loss =
`video_loss_weight * video_loss + image_loss_weight * image_loss`. Targets (`--target`) are the token ids of a frozen
visual tokenizer (`BEVTVisualTokenizer`) on a half-size copy of the input (the paper's), or tokenizer-free per-patch
HOG (MaskFeat) or normalised pixels (MAE) of the input (`bevt.targets`); masks are BEiT blocks (images) and BEVT
tubes (videos). Without data flags, a small synthetic dataset is written under the output folder and a tiny model is
trained on it for a short schedule (see the README).

The flags and their recipe / demo defaults: `bevt.training.pretraining_arguments`; the loop:
`bevt.training.TrainingEngine` (this script gives it `pretraining_step`); the pictures and `training_results.json`:
`bevt.training.pretraining_outputs`.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.modeling_tokenizer import BEVTVisualTokenizer
from bevt.pretraining import PretrainingData, inflate_video_patch_embedding, model_inputs, random_tokenizer
from bevt.targets import PatchTargets
from bevt.training import (
    BEVTArgumentParser,
    StepContext,
    StepOutput,
    TrainingEngine,
    build_lr_scheduler,
    build_optimizer,
    fail,
    resolve_schedule,
)
from bevt.training.arguments import UsageError, check_loaded_weights, load_error
from bevt.training.pretraining_arguments import PretrainingArguments, parse_config_overrides
from bevt.training.pretraining_outputs import StreamPictures, write_training_results
from bevt.training.runtime import (
    HUB_IGNORE_PATTERNS,
    compile_encoder,
    push_to_hub,
    run_script,
    start_run,
    write_demo_data_once,
)

logger = get_logger(__name__)

TRACKER_PROJECT = "bevt_pretraining"  # Accelerate tracker project: logs under <output_dir>/bevt_pretraining
# The scalars of every step, averaged over micro-batches and ranks (a stream absent from the stage counts as 0):
# the losses, then the per-stream quality (masked-token accuracy for token ids, masked-patch R^2 for HOG / pixels).
STAT_NAMES = ("loss", "video_loss", "image_loss", "video_mask_accuracy", "image_mask_accuracy")
REGRESSION_STAT_NAMES = ("loss", "video_loss", "image_loss", "video_mask_r2", "image_mask_r2")
HOW_TO_GET_A_TOKENIZER = (
    "convert OpenAI's DALL-E encoder (`python -m bevt.convert --format dalle-encoder --checkpoint encoder.pkl "
    "--output-dir dall-e-tokenizer`, see the README) or train one on your own data with run_tokenizer_training.py, "
    "and pass the folder with --tokenizer_name_or_path; or use --target hog / --target pixel (no tokenizer needed)"
)


def stat_names(target: str) -> tuple[str, ...]:
    return STAT_NAMES if target == "tokenizer" else REGRESSION_STAT_NAMES


def build_parser() -> BEVTArgumentParser:
    """The command-line flags; every flag's help states its default (recipe and demo defaults where they differ)."""
    return BEVTArgumentParser(
        PretrainingArguments,
        description="BEVT pretraining (masked image/video modeling) with Accelerate. Without --video_shards and "
        "--image_shards, runs the built-in demo on synthetic data.",
    )


def parse_args(argv: list[str] | None = None) -> PretrainingArguments:
    """Parse `--config` and the command line, fill the recipe or demo defaults, and check every value."""
    return build_parser().parse(argv)


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ---------------------------------------------------------------------------------------------------------------


def resolve_target(args: PretrainingArguments) -> str:
    """The run's `--target`: the flag, else a `--model_name_or_path` model's own `target_type`, else the recipe's
    (demo: pixel, recipe: tokenizer). `--target tokenizer` needs a tokenizer (or `--random_tokenizer`, for tests)."""
    if args.model_name_or_path:
        try:
            saved = BEVTConfig.from_pretrained(args.model_name_or_path).target_type
        except (OSError, ValueError) as err:
            raise load_error("--model_name_or_path", args.model_name_or_path, err) from None
        tokenizer_flag = "--tokenizer_name_or_path" if args.tokenizer_name_or_path else "--random_tokenizer"
        if saved != "tokenizer" and (args.tokenizer_name_or_path or args.random_tokenizer):
            raise UsageError(
                f"{tokenizer_flag} gives token targets, but --model_name_or_path {args.model_name_or_path} was "
                f"pretrained with target_type {saved!r}: drop {tokenizer_flag} (or start a new model)"
            )
        if args.target_given and args.target != saved:
            raise UsageError(
                f"--target {args.target} does not match --model_name_or_path {args.model_name_or_path}, pretrained "
                f"with target_type {saved!r}: pass --target {saved} (or omit --target), or start a new model"
            )
        args.target = saved
    if args.target == "tokenizer" and not args.tokenizer_name_or_path and not args.random_tokenizer:
        raise UsageError(
            "--target tokenizer needs --tokenizer_name_or_path (a BEVTVisualTokenizer folder): "
            + HOW_TO_GET_A_TOKENIZER
        )
    return args.target


def build_model(
    args: PretrainingArguments, vocab_size: int | None, target: str | None = None
) -> BEVTForMaskedVideoModeling:
    """From `--model_name_or_path`, or a new model from `--model_preset` (+ overrides, + `--swin2d_checkpoint`),
    predicting `target` (default `args.target`)."""
    target = target or args.target
    if args.model_name_or_path:
        try:
            updates = {"drop_path_rate": args.drop_path_rate} if args.drop_path_rate_given else {}
            model, info = BEVTForMaskedVideoModeling.from_pretrained(
                args.model_name_or_path, output_loading_info=True, **updates
            )
            # a classifier folder: the prediction head is new (allowed), the backbone must load
            check_loaded_weights(model, info, new_ok=("head.",))
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise load_error("--model_name_or_path", args.model_name_or_path, err) from None
        if model.config.target_type != target:
            fail("--target", f"{model.config.target_type!r} (the --model_name_or_path model's)", target)
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            expected = f"a tokenizer with vocab_size {model.config.vocab_size} (the model's)"
            fail("--tokenizer_name_or_path", expected, vocab_size)
    else:
        overrides = {
            "image_size": args.image_size,
            "num_frames": args.num_frames,
            "drop_path_rate": args.drop_path_rate,
            "target_type": target,
        }
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        overrides.update(parse_config_overrides(args.config_overrides))
        try:
            config = BEVTConfig.from_preset(args.model_preset, **overrides)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--model_preset/--config_overrides give an invalid config: {err}") from None
        model = BEVTForMaskedVideoModeling(config)
        if args.swin2d_checkpoint:
            from bevt.convert import load_swin2d_into

            try:
                report = load_swin2d_into(model, args.swin2d_checkpoint)
            except ValueError as err:  # UnsafeCheckpointError, ConversionError, a corrupt file
                raise UsageError(f"--swin2d_checkpoint {args.swin2d_checkpoint}: {err}") from None
            logger.info(
                f"Initialised from the 2D Swin checkpoint {args.swin2d_checkpoint}:\n{report.summary()}"
            )
    model.config.video_loss_weight = args.video_loss_weight
    model.config.image_loss_weight = args.image_loss_weight
    if args.freeze_video_patch_embedding:
        model.bevt.embeddings.patch_embeddings.projection.requires_grad_(False)
        logger.info("The video patch embedding (Conv3d) stays at its initial weights (--freeze_video_patch_embedding)")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def load_tokenizer(args: PretrainingArguments) -> BEVTVisualTokenizer:
    """The frozen target tokenizer from `--tokenizer_name_or_path` (a converted `BEVTVisualTokenizer` folder)."""
    try:
        tokenizer, info = BEVTVisualTokenizer.from_pretrained(
            args.tokenizer_name_or_path, output_loading_info=True
        )
        check_loaded_weights(tokenizer, info, what="BEVTVisualTokenizer")
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise load_error("--tokenizer_name_or_path", args.tokenizer_name_or_path, err) from None
    expected = args.image_size // 16 * tokenizer.config.downsample_factor
    if args.tokenizer_size != expected:
        cell = tokenizer.config.downsample_factor
        fail(
            "--tokenizer_size",
            f"{expected} (one {cell}-px tokenizer cell per 16-px patch of --image_size {args.image_size})",
            args.tokenizer_size,
        )
    return tokenizer.eval()


def build_random_tokenizer(args: PretrainingArguments, vocab_size: int) -> BEVTVisualTokenizer:
    """`--random_tokenizer`: a random-weight tokenizer (tests only), with a loud warning."""
    logger.warning(
        "\n"
        + "!" * 100
        + "\n!! --random_tokenizer: the visual tokenizer has RANDOM weights. Its targets are meaningless for real "
        "pretraining:\n!! use this for tests only. For informative targets use --target hog / --target pixel, or a "
        "converted DALL-E\n!! encoder or a tokenizer trained with run_tokenizer_training.py (--tokenizer_name_or_path)."
        "\n" + "!" * 100
    )
    if args.tokenizer_size != args.image_size // 2:
        fail(
            "--tokenizer_size",
            f"{args.image_size // 2} (--image_size // 2) with the random tokenizer",
            args.tokenizer_size,
        )
    return random_tokenizer(vocab_size, args.tokenizer_size, seed=args.seed)


def data_shards(args: PretrainingArguments, accelerator: Accelerator) -> tuple[list[str], list[str] | None]:
    """(image shards, video shards or None): the flags', or the demo's (written once under `<output_dir>/demo_data`)."""
    if args.demo:
        from bevt.data.demo_pretraining import write_demo_pretraining_shards

        logger.info(
            "No --video_shards/--image_shards given: running the built-in demo (synthetic data, tiny model)."
        )
        demo = write_demo_data_once(
            accelerator, Path(args.output_dir) / "demo_data", write_demo_pretraining_shards
        )
        return demo.image_shards, demo.video_shards if args.stage == "joint" else None
    return args.image_shards, args.video_shards if args.stage == "joint" else None


def build_data(
    args: PretrainingArguments, accelerator: Accelerator, image_shards, video_shards
) -> PretrainingData:
    """This rank's image (and, in the joint stage, video) streams."""
    key_log = None
    if args.log_sample_keys:
        key_log = Path(args.output_dir) / f"sample_keys_rank{accelerator.process_index}.txt"
    try:
        return PretrainingData(
            args.data_config(),
            image_shards,
            video_shards,
            seed=args.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            key_log=key_log,
            stream_options=args.stream_options(),
        )
    # missing files, unreachable URLs, a missing fsspec backend
    except (OSError, ValueError, ImportError) as err:
        raise UsageError(f"--image_shards/--video_shards: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


def build_targets(
    args: PretrainingArguments, model: BEVTForMaskedVideoModeling
) -> BEVTVisualTokenizer | PatchTargets:
    """What computes the labels: the frozen tokenizer (`--target tokenizer`) or the model's HOG / pixel targets."""
    if args.target == "tokenizer":
        if args.tokenizer_name_or_path:
            return load_tokenizer(args)
        return build_random_tokenizer(args, model.config.vocab_size)
    return PatchTargets.from_config(model.config)


def pretraining_step(
    model: torch.nn.Module,
    targets: BEVTVisualTokenizer | PatchTargets,
    target: str,
    pictures: StreamPictures | None = None,
):
    """The engine's step: labels from the frozen tokenizer or `PatchTargets` (no grad), then the masked image
    (+ video) modeling losses."""
    names = stat_names(target)

    def step(batch: dict[str, Any], context: StepContext) -> StepOutput:
        inputs = model_inputs(batch, targets, context.device)
        if pictures is not None:
            pictures.remember(inputs)
        output = model(**inputs)
        metrics = {name: getattr(output, name) for name in names}
        return StepOutput(output.loss, {k: v if v is not None else 0.0 for k, v in metrics.items()})

    return step


def format_metrics(stage: str, target: str = "tokenizer"):
    label, suffix = ("masked-token acc", "accuracy") if target == "tokenizer" else ("masked R^2", "r2")

    def text(metrics: dict[str, float]) -> str:
        if stage == "image":
            return f"loss {metrics['loss']:.4f} | {label} {metrics[f'image_mask_{suffix}']:.3f}"
        return (
            f"loss {metrics['loss']:.4f} (video {metrics['video_loss']:.4f}, image {metrics['image_loss']:.4f}) | "
            f"{label} video {metrics[f'video_mask_{suffix}']:.3f}, image {metrics[f'image_mask_{suffix}']:.3f}"
        )

    return text


def reported_names(args: PretrainingArguments) -> list[str]:
    return [n for n in stat_names(args.target) if args.stage == "joint" or not n.startswith("video")]


def target_description(args: PretrainingArguments, for_card: bool = False) -> str:
    """The run's targets in words (training_results.json, the run header; `for_card`: the model card, which names a
    local tokenizer folder by its name only)."""
    if args.target == "hog":
        return "HOG: per-16px-patch histograms of oriented gradients (MaskFeat), L2 regression"
    if args.target == "pixel":
        return "pixels: per-16px-patch normalised pixels (MAE), L2 regression"
    from bevt.modelcard import card_source

    source = args.tokenizer_name_or_path or "RANDOM-weight tokenizer (--random_tokenizer, tests only)"
    if for_card and args.tokenizer_name_or_path:
        source = card_source(source)
    return f"visual-token ids of {source}"


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def save_final_model(
    args: PretrainingArguments, accelerator: Accelerator, model: torch.nn.Module, engine: TrainingEngine
) -> None:
    """`save_pretrained` folder: model + config, video processor, model card, training results."""
    from bevt.processing_bevt import BEVTVideoProcessor

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards
    video_trained = args.stage == "joint" and args.video_loss_weight > 0
    if state_dict and not video_trained:  # (state_dict is empty on non-main FSDP ranks)
        # The video patch embedding got no gradient: make it from the image one (as stage 2 starts officially)
        state_dict = inflate_video_patch_embedding(state_dict)
        logger.info(
            "No video loss trained the video patch embedding (Conv3d): saved it inflated from the trained image "
            "one (Conv2d weight repeated over the %d-frame temporal patch / %d, bias and norm copied), as the "
            "official code initialises stage 2 from stage 1",
            unwrapped.config.patch_size[0],
            unwrapped.config.patch_size[0],
        )
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        size = {"shortest_edge": args.image_size}
        crop = {"height": args.image_size, "width": args.image_size}
        BEVTVideoProcessor(
            num_frames=args.num_frames, frame_interval=args.frame_interval, size=size, crop_size=crop
        ).save_pretrained(args.output_dir)
        results = write_training_results(args, engine.state, target_description(args))
        write_model_card(args, unwrapped, results, engine.schedule)
    accelerator.wait_for_everyone()


def write_model_card(
    args: PretrainingArguments, model: BEVTForMaskedVideoModeling, results: dict, schedule
) -> None:
    """README.md model card (`bevt.modelcard.build_model_card`) with the run's setup and how the metrics moved."""
    from bevt.modelcard import build_model_card, card_source

    first, final = results["first"], results["final_window"]
    rows = "\n".join(
        f"| {n} | {first.get(n, math.nan):.4f} | {final.get(n, math.nan):.4f} |" for n in reported_names(args)
    )
    task = "masked image modeling" if args.stage == "image" else "masked image + masked video modeling"
    demo_note = (
        f"\n\n**Demo run** (tiny model, synthetic data, {args.target} targets): shows the pipeline works; it is not a "
        "useful pretrained model."
        if args.demo
        else ""
    )
    quality = (
        "Quality: masked-token accuracy (fraction of masked positions whose token id is predicted)."
        if args.target == "tokenizer"
        else "Quality: masked-patch R^2 (1 - squared error / variance of the masked targets; 0 = predicting their "
        "mean, 1 = perfect)."
    )
    summary = (
        f"A `BEVTForMaskedVideoModeling` checkpoint of the `bevt` package (BEVT: BERT Pretraining of Video "
        f"Transformers, Wang et al., CVPR 2022) after the {args.stage} stage ({task}) of `run_pretraining.py`, "
        f"{results['steps']} optimizer steps.{demo_note}\n\n"
        f"| metric | first step | mean of the last {args.logging_steps} steps |\n|---|---|---|\n{rows}\n\n{quality}"
    )
    data = (
        "built-in synthetic demo data"
        if args.demo
        else f"images {[card_source(s) for s in args.image_shards]}"
    )
    if args.stage == "joint" and not args.demo:
        data += f"; videos {[card_source(s) for s in args.video_shards]}"
    hyperparameters = {
        "stage": args.stage,
        "data": data,
        "targets": target_description(args, for_card=True),
        "samples seen": ", ".join(f"{v} {k}s" for k, v in results["samples"].items()),
        "input": f"{args.image_size}x{args.image_size}, {args.num_frames} frames, interval {args.frame_interval}",
        "masking": f"ratio {args.mask_ratio}, tube length {args.tube_range[0]}-{args.tube_range[1]} of T/2",
        "batch per device": (f"{args.video_batch_size} videos + " if args.stage == "joint" else "")
        + f"{args.image_batch_size} images, accumulation {args.gradient_accumulation_steps}",
        "optimizer": f"AdamW lr {args.learning_rate}, weight decay {args.weight_decay}, grad clip {args.max_grad_norm}",
        "schedule": f"{args.lr_scheduler_type}, {schedule.num_warmup_steps} warmup of {schedule.max_train_steps} steps",
    }
    card = build_model_card(
        model_name=Path(args.output_dir).resolve().name,
        config=model.config,
        summary=summary,
        tags=["pretraining", "masked-video-modeling"],
        num_parameters=model.num_parameters(),
        hyperparameters=hyperparameters,
        repo_id=args.hub_model_id,
    )
    card.save(Path(args.output_dir) / "README.md")


def log_run_header(args: PretrainingArguments, engine: TrainingEngine, model: torch.nn.Module) -> None:
    per_step = ", ".join(f"{count} {stream}s" for stream, count in engine.samples_per_step.items())
    config = engine.accelerator.unwrap_model(model).config
    logger.info(
        f"***** Pretraining ({args.stage} stage{', demo' if args.demo else ''}) *****\n"
        f"  model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters\n"
        f"  targets: {target_description(args)} ({config.head_output_size} outputs per position)\n"
        f"  per optimizer step: {per_step} ({engine.accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation)\n"
        f"  steps: {engine.schedule.max_train_steps} (warmup {engine.schedule.num_warmup_steps}), starting at "
        f"{engine.state.step}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolve_target(args)  # before anything is written: a missing tokenizer is a usage error
    accelerator = start_run(args, quiet_accelerate=True)  # Accelerate's per-file save logs off
    image_shards, video_shards = data_shards(args, accelerator)
    set_seed(args.seed)  # the same initial weights on every rank

    tokenizer = load_tokenizer(args) if args.target == "tokenizer" and args.tokenizer_name_or_path else None
    model = build_model(args, tokenizer.config.vocab_size if tokenizer is not None else None, args.target)
    targets = tokenizer if tokenizer is not None else build_targets(args, model)
    if isinstance(targets, BEVTVisualTokenizer):
        targets.to(accelerator.device)

    data = build_data(args, accelerator, image_shards, video_shards)
    streams = {"video": args.video_batch_size} if video_shards is not None else {}
    streams["image"] = args.image_batch_size
    main_batch = next(iter(streams.values())) * args.gradient_accumulation_steps * accelerator.num_processes
    schedule = resolve_schedule(
        samples_per_epoch=data.samples_per_epoch(count=args.max_train_steps is None),
        samples_per_step=main_batch,
        max_train_steps=args.max_train_steps,
        num_train_epochs=args.num_train_epochs,
        num_warmup_steps=args.num_warmup_steps,
        warmup_ratio=args.warmup_ratio,
        eval_steps=args.visualize_steps or None,  # the pictures are the run's `evaluate` (and at the end)
    )
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(args, optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:
        compile_encoder(accelerator.unwrap_model(model))

    engine = TrainingEngine(
        accelerator, model, optimizer, lr_scheduler, data, args=args, schedule=schedule, streams=streams,
        project_name=TRACKER_PROJECT, desc="pretraining",
    )  # fmt: skip
    engine.resume()
    log_run_header(args, engine, model)
    pictures = StreamPictures(args, accelerator, model, targets) if args.visualize_steps != 0 else None
    exit_code = engine.run(
        pretraining_step(model, targets, args.target, pictures),
        evaluate=pictures,
        format_metrics=format_metrics(args.stage, args.target),
    )
    if exit_code == 0:
        save_final_model(args, accelerator, model, engine)
        if accelerator.is_main_process:
            print(engine.summary("Pretraining done", reported_names(args)), flush=True)
            if args.push_to_hub:
                push_to_hub(
                    args,
                    commit_message=f"BEVT pretraining ({args.stage} stage), step {schedule.max_train_steps}",
                    ignore_patterns=(*HUB_IGNORE_PATTERNS, f"{TRACKER_PROJECT}/*", "sample_keys_rank*"),
                )
    data.close()
    return exit_code


if __name__ == "__main__":
    run_script(main)
