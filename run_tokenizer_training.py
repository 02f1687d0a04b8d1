#!/usr/bin/env python
"""Train your own visual tokenizer (BEVT's pretraining targets) with 🤗 Accelerate.

    accelerate launch run_tokenizer_training.py                   # built-in demo: tiny tokenizer, synthetic images
    accelerate launch run_tokenizer_training.py --image_shards "imagenet/train-*.tar" --output_dir my-tokenizer
    accelerate launch run_tokenizer_training.py --video_shards "surgery/train-*.tar" --tokenizer_type dall-e \\
        --vocab_size 8192 --image_size 112 --max_train_steps 100000
    accelerate launch run_pretraining.py --tokenizer_name_or_path my-tokenizer ...   # the ids as targets

Streams image shards and/or frames sampled from video shards (`--num_frames` frames `--frame_interval` apart per
clip), random resized crops in [0, 1] of `--image_size` px, and trains a discrete tokenizer with a decoder
(`bevt.tokenizer_training`): a VQGAN (default; EMA or straight-through codebook, dead-code restarts, L1/L2 + optional
perceptual loss) or the DALL-E dVAE (Gumbel-softmax, KL to the uniform prior). The first `--held_out_samples` of each
shard flag (in listed order, unshuffled) are kept out of training and measure the result. Without data flags, the
pretraining demo's synthetic images are written under the output folder and a tokenizer of the pretraining demo's
geometry (32 px -> 4x4 ids, 64 codes) is trained on them.

The output folder is a `BEVTVisualTokenizer` (`from_pretrained`, `--tokenizer_name_or_path` of `run_pretraining.py`)
with its encoder and decoder, `training_results.json` (held-out PSNR and its mean-colour baseline, codebook
perplexity and use), `reconstructions.png` (held-out originals above their reconstructions) and a model card. The
flags: `bevt.training.tokenizer_arguments`; the loop: `bevt.training.TrainingEngine` (this script gives it
`tokenizer_step`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from bevt.data.tokenizer_data import HeldOut, TokenizerTrainingData, load_held_out
from bevt.data.transforms import TokenizerTrainingTransform
from bevt.modeling_tokenizer import BEVTVisualTokenizer
from bevt.tokenizer_training import TokenizerTrainingModel, evaluate_reconstruction, save_reconstruction_grid
from bevt.training import (
    BEVTArgumentParser,
    StepContext,
    StepOutput,
    TrainingEngine,
    TrainState,
    build_lr_scheduler,
    build_optimizer,
    fail,
    resolve_schedule,
)
from bevt.training.arguments import UsageError
from bevt.training.runtime import HUB_IGNORE_PATTERNS, push_to_hub, run_script, start_run, write_demo_data_once
from bevt.training.tokenizer_arguments import TokenizerArguments

logger = get_logger(__name__)

TRACKER_PROJECT = "bevt_tokenizer"  # Accelerate tracker project: logs under <output_dir>/bevt_tokenizer
RESULTS_FILE, PICTURE_FILE = "training_results.json", "reconstructions.png"
PICTURE_SAMPLES = 16  # held-out images in the PNG
# The numbers of the held-out evaluation (bevt.tokenizer_training.evaluate_reconstruction) that are logged.
EVAL_NAMES = ("psnr", "mean_colour_psnr", "l1", "perplexity", "codebook_usage", "codes_used")


def build_parser() -> BEVTArgumentParser:
    """The command-line flags; every flag's help states its default (recipe and demo defaults where they differ)."""
    return BEVTArgumentParser(
        TokenizerArguments,
        description="Train a visual tokenizer (VQGAN or DALL-E dVAE, with its decoder) for BEVT's pretraining targets "
        "with Accelerate. Without --image_shards and --video_shards, runs the built-in demo on synthetic images.",
    )


def parse_args(argv: list[str] | None = None) -> TokenizerArguments:
    """Parse `--config` and the command line, fill the recipe or demo defaults, and check every value."""
    return build_parser().parse(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------------------------


def data_shards(args: TokenizerArguments, accelerator: Accelerator) -> dict[str, Any]:
    """`{"image": shards, "video": shards}` of the flags, or the pretraining demo's images (written once under
    `<output_dir>/demo_data`, the same synthetic shards `run_pretraining.py`'s demo writes)."""
    if not args.demo:
        return args.streams
    from bevt.data.demo_pretraining import write_demo_pretraining_shards

    logger.info("No --image_shards/--video_shards given: running the built-in demo (synthetic images, tiny tokenizer).")
    demo = write_demo_data_once(accelerator, Path(args.output_dir) / "demo_data", write_demo_pretraining_shards)
    return {"image": demo.image_shards}


def shard_flag(kind: str, args: TokenizerArguments) -> str:
    return "demo data" if args.demo else f"--{kind}_shards"


def held_out_samples(args: TokenizerArguments, shards: dict[str, Any]) -> dict[str, HeldOut]:
    """Per stream, the first `--held_out_samples` samples of the shards in listed order (the same on every rank and in
    every run over these shards): the evaluation set, kept out of training."""
    held_out = {}
    for kind, files in shards.items():
        try:
            held = load_held_out(files, kind, args.held_out_samples, args.image_size, args.stream_options())
        except (OSError, ValueError, ImportError) as err:  # no shards, unreachable URLs, a missing fsspec backend
            raise UsageError(f"{shard_flag(kind, args)}: {err}") from None
        if not held.keys:
            raise UsageError(f"{shard_flag(kind, args)}: no {kind}s found in {files} (no sample could be read)")
        if held.exhausted:
            fail(
                "--held_out_samples",
                f"less than the {len(held.keys)} {kind}s of {shard_flag(kind, args)} (nothing would be left to train on)",
                args.held_out_samples,
            )
        held_out[kind] = held
    return held_out


def build_model(args: TokenizerArguments, max_train_steps: int) -> TokenizerTrainingModel:
    """A new tokenizer from the architecture flags, or the `--tokenizer_name_or_path` folder, with its objective."""
    objective = args.objective(max_train_steps)
    if args.tokenizer_name_or_path is None:
        try:
            return TokenizerTrainingModel(args.tokenizer_config(), objective)
        except ValueError as err:  # an architecture the config refuses
            raise UsageError(f"--tokenizer_type/--width/--channel_multipliers/--vocab_size: {err}") from None
    try:
        tokenizer = BEVTVisualTokenizer.from_pretrained(args.tokenizer_name_or_path)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise UsageError(f"--tokenizer_name_or_path {args.tokenizer_name_or_path}: {err}") from None
    config = tokenizer.config
    if not config.has_decoder:
        fail("--tokenizer_name_or_path", "a tokenizer folder with a decoder (training reconstructs pixels)", config)
    if config.tokenizer_type != args.tokenizer_type:
        fail("--tokenizer_type", f"{config.tokenizer_type!r}, the --tokenizer_name_or_path folder's", args.tokenizer_type)
    if args.image_size % config.downsample_factor:
        fail("--image_size", f"a multiple of the folder's {config.downsample_factor}x downsampling", args.image_size)
    config.image_size = args.image_size
    return TokenizerTrainingModel(None, objective, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# The step and the evaluation
# ---------------------------------------------------------------------------------------------------------------


def tokenizer_step(model: torch.nn.Module):
    """The engine's step: the tokenizer's training losses on one batch of frames (`(N, 3, S, S)` in [0, 1]). The
    optimizer step drives the DALL-E schedules and the dead-code restarts."""

    def step(batch: dict[str, Any], context: StepContext) -> StepOutput:
        output = model(batch["pixel_values"].to(context.device, non_blocking=True), step=context.step)
        return StepOutput(output.loss, output.metrics)

    return step


class HeldOutEvaluation:
    """`evaluate(state)` for the engine: reconstruction and codebook use on the held-out images (main process), logged
    and kept in `results` (the last evaluation) for `training_results.json`."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, held_out: dict[str, HeldOut]) -> None:
        self.accelerator, self.model = accelerator, model
        self.images = torch.cat([held.images for held in held_out.values()])
        self.results: dict[str, float] = {}

    def __call__(self, state: TrainState) -> dict[str, float] | None:
        if not self.accelerator.is_main_process:
            return None
        model = self.accelerator.unwrap_model(self.model)
        model.train(False)
        results = evaluate_reconstruction(model, self.images.to(self.accelerator.device))
        model.train(True)
        self.results = {name: results[name] for name in (*EVAL_NAMES, "num_images")}
        logger.info(
            f"step {state.step}: held-out ({results['num_images']} images) PSNR {results['psnr']:.2f} dB (mean-colour "
            f"baseline {results['mean_colour_psnr']:.2f} dB), L1 {results['l1']:.4f} | codebook perplexity "
            f"{results['perplexity']:.1f}, {results['codes_used']} of {model.config.vocab_size} codes used"
        )
        return {name: float(results[name]) for name in EVAL_NAMES}


def format_metrics(tokenizer_type: str):
    def text(metrics: dict[str, float]) -> str:
        terms = (
            f"commitment {metrics['commitment_loss']:.4f}, restarted {metrics['codes_restarted']:.1f}"
            if tokenizer_type == "vqgan"
            else f"nll {metrics['nll']:.4f}, kl {metrics['kl']:.3f}, temperature {metrics['temperature']:.3f}"
        )
        return (
            f"loss {metrics['loss']:.4f} (L1 {metrics['reconstruction_loss']:.4f}, {terms}) | psnr "
            f"{metrics['psnr']:.2f} | batch perplexity {metrics['perplexity']:.1f}"
        )

    return text


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def save_final_tokenizer(
    args: TokenizerArguments,
    accelerator: Accelerator,
    model: torch.nn.Module,
    engine: TrainingEngine,
    evaluation: HeldOutEvaluation,
    held_out: dict[str, HeldOut],
) -> dict[str, Any]:
    """The `BEVTVisualTokenizer` folder (config + safetensors, encoder and decoder), `training_results.json`,
    `reconstructions.png` and the model card, on the main process."""
    accelerator.wait_for_everyone()
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        output_dir = Path(args.output_dir)
        unwrapped.save_pretrained(output_dir)
        images = evaluation.images[:PICTURE_SAMPLES]
        with torch.no_grad():
            reconstructions = unwrapped.reconstruct(images.to(accelerator.device)).cpu()
        save_reconstruction_grid(images, reconstructions, output_dir / PICTURE_FILE)
        state = engine.state
        results = {
            "tokenizer_type": args.tokenizer_type,
            "steps": state.step,
            "samples": {k: v for k, v in state.samples.items() if v},
            "held_out": {
                **evaluation.results,
                "images": {kind: len(held.keys) for kind, held in held_out.items()},
                "psnr_margin_over_mean_colour": evaluation.results["psnr"] - evaluation.results["mean_colour_psnr"],
            },
            "first": state.first_metrics,
            "final_window": state.last_window,
            "demo": args.demo,
        }
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        write_model_card(args, unwrapped, results, engine)
    accelerator.wait_for_everyone()
    return results


def write_model_card(
    args: TokenizerArguments, model: TokenizerTrainingModel, results: dict, engine: TrainingEngine
) -> None:
    """README.md model card (`bevt.modelcard.build_tokenizer_model_card`): what this run did and measured."""
    from bevt.modelcard import build_tokenizer_model_card

    held = results["held_out"]
    counts = ", ".join(f"{n} {kind}s" for kind, n in held["images"].items())
    demo_note = (
        " **Demo run** (tiny tokenizer, synthetic images): the targets of the pretraining demo, not a tokenizer for "
        "real video."
        if args.demo
        else ""
    )
    summary = (
        f"A visual tokenizer (`BEVTVisualTokenizer`, {args.tokenizer_type}) of the `bevt` package, trained with "
        f"`run_tokenizer_training.py` for {results['steps']} optimizer steps: its token ids are the prediction targets "
        f"of BEVT pretraining (BEVT: BERT Pretraining of Video Transformers, Wang et al., CVPR 2022), and it has "
        f"the decoder back to pixels.{demo_note}"
    )
    evaluation = (
        f"Held-out images ({counts}: the first of the shards in listed order, never trained on; centre squares, "
        f"{args.image_size} px), `decode(get_codebook_indices(x))` against `x`:\n\n| metric | value |\n|---|---|\n"
        f"| PSNR | {held['psnr']:.2f} dB |\n| PSNR of the mean-colour baseline | {held['mean_colour_psnr']:.2f} dB |\n"
        f"| L1 (pixels in [0, 1]) | {held['l1']:.4f} |\n| codebook perplexity | {held['perplexity']:.1f} of "
        f"{model.config.vocab_size} |\n| codes used | {held['codes_used']} ({100 * held['codebook_usage']:.1f}%) |\n\n"
        f"`{PICTURE_FILE}`: held-out originals (odd rows) above their reconstructions."
    )
    data = "built-in synthetic demo images" if args.demo else "; ".join(
        f"{kind}s {files}" for kind, files in args.streams.items()
    )
    hyperparameters = {
        "data": data,
        "samples seen": ", ".join(f"{v} {k}s" for k, v in results["samples"].items()),
        "crops": f"{args.image_size} px, area {args.crop_scale[0]}-{args.crop_scale[1]}, flip {args.flip_prob}",
        "objective": json.dumps(model.args.to_dict()),
        "batch per device": f"{args.image_batch_size} images"
        + (f" + {args.video_batch_size} clips x {args.num_frames} frames" if "video" in args.streams else "")
        + f", accumulation {args.gradient_accumulation_steps}",
        "optimizer": f"AdamW lr {args.learning_rate}, weight decay {args.weight_decay}, grad clip {args.max_grad_norm}",
        "schedule": f"{args.lr_scheduler_type}, {engine.schedule.num_warmup_steps} warmup of "
        f"{engine.schedule.max_train_steps} steps",
    }
    card = build_tokenizer_model_card(
        model_name=Path(args.output_dir).resolve().name,
        config=model.config,
        summary=summary,
        evaluation=evaluation,
        num_parameters=sum(p.numel() for p in model.tokenizer.parameters()),
        hyperparameters=hyperparameters,
        repo_id=args.hub_model_id,
    )
    card.save(Path(args.output_dir) / "README.md")


def log_run_header(args: TokenizerArguments, engine: TrainingEngine, model: TokenizerTrainingModel) -> None:
    per_step = ", ".join(f"{count} {stream}s" for stream, count in engine.samples_per_step.items())
    config = model.config
    grid = config.image_size // config.downsample_factor
    logger.info(
        f"***** Tokenizer training ({args.tokenizer_type}{', demo' if args.demo else ''}) *****\n"
        f"  tokenizer: {sum(p.numel() for p in model.tokenizer.parameters()) / 1e6:.2f}M parameters, "
        f"{config.vocab_size} codes, {config.image_size} px -> {grid}x{grid} ids\n"
        f"  per optimizer step: {per_step} ({engine.accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation)\n"
        f"  steps: {engine.schedule.max_train_steps} (warmup {engine.schedule.num_warmup_steps}), starting at "
        f"{engine.state.step}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = start_run(args, quiet_accelerate=True)  # Accelerate's per-file save logs off
    shards = data_shards(args, accelerator)
    held_out = held_out_samples(args, shards)

    streams = {"image": args.image_batch_size, "video": args.video_batch_size}
    streams = {kind: streams[kind] for kind in shards}
    transform = TokenizerTrainingTransform(args.image_size, scale=args.crop_scale, flip=args.flip_prob)
    try:
        data = TokenizerTrainingData(
            shards, transform, streams, num_frames=args.num_frames, frame_interval=args.frame_interval,
            exclude_keys={kind: held.keys for kind, held in held_out.items()}, seed=args.seed,
            rank=accelerator.process_index, world_size=accelerator.num_processes, shuffle_buffer=args.shuffle_buffer,
            num_workers=args.num_workers, stream_options=args.stream_options(),
        )  # fmt: skip
    except (OSError, ValueError, ImportError) as err:
        raise UsageError(f"--image_shards/--video_shards: {err}") from None
    main_batch = streams.get("video", streams.get("image"))
    schedule = resolve_schedule(
        samples_per_epoch=data.samples_per_epoch(count=args.max_train_steps is None),
        samples_per_step=main_batch * args.gradient_accumulation_steps * accelerator.num_processes,
        max_train_steps=args.max_train_steps,
        num_train_epochs=args.num_train_epochs,
        num_warmup_steps=args.num_warmup_steps,
        warmup_ratio=args.warmup_ratio,
        eval_steps=args.eval_steps,
    )

    set_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, schedule.max_train_steps)
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(args, optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:
        tokenizer = accelerator.unwrap_model(model).tokenizer
        tokenizer.encoder.compile(dynamic=False)
        tokenizer.decoder.compile(dynamic=False)

    engine = TrainingEngine(
        accelerator, model, optimizer, lr_scheduler, data, args=args, schedule=schedule, streams=streams,
        project_name=TRACKER_PROJECT, desc="tokenizer training",
    )  # fmt: skip
    engine.resume()
    log_run_header(args, engine, accelerator.unwrap_model(model))
    evaluation = HeldOutEvaluation(accelerator, model, held_out)
    exit_code = engine.run(
        tokenizer_step(model), evaluate=evaluation, format_metrics=format_metrics(args.tokenizer_type)
    )
    if exit_code == 0:
        results = save_final_tokenizer(args, accelerator, model, engine, evaluation, held_out)
        if accelerator.is_main_process:
            held = results["held_out"]
            lines = [
                f"Held-out ({held['num_images']} images): PSNR {held['psnr']:.2f} dB vs {held['mean_colour_psnr']:.2f} "
                f"dB for the mean colour; codebook perplexity {held['perplexity']:.1f}, {held['codes_used']} of "
                f"{accelerator.unwrap_model(model).config.vocab_size} codes used",
                f"Reconstructions: {Path(args.output_dir) / PICTURE_FILE}",
            ]
            names = [n for n in ("loss", "reconstruction_loss", "psnr", "perplexity") if n in engine.state.first_metrics]
            print(engine.summary("Tokenizer training done", names, extra_lines=lines), flush=True)
            if args.push_to_hub:
                push_to_hub(
                    args,
                    commit_message=f"BEVT visual tokenizer ({args.tokenizer_type}), step {schedule.max_train_steps}",
                    ignore_patterns=(*HUB_IGNORE_PATTERNS, f"{TRACKER_PROJECT}/*"),
                )
    data.close()
    return exit_code


if __name__ == "__main__":
    run_script(main)
