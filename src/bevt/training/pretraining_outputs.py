"""What `run_pretraining.py` writes besides the weights: the `--visualize_steps` pictures (`StreamPictures`, the
engine's `evaluate` callback) and `training_results.json` (`write_training_results`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .engine import TrainState
from .pretraining_arguments import PretrainingArguments

logger = get_logger(__name__)


class StreamPictures:
    """`--visualize_steps`: the engine's `evaluate` callback (every N steps and at the end) that draws, on the main
    process, one PNG per stream of the last micro-batch with the current weights (no grad, eval mode: no random
    numbers are drawn, so resuming stays exact): `<output_dir>/visualizations/step-<S>-<video|image>.png`, and
    TensorBoard images `pictures/<stream>` with `--with_tracking`."""

    def __init__(self, args: PretrainingArguments, accelerator: Accelerator, model, targets) -> None:
        self.accelerator, self.model, self.targets, self.target = accelerator, model, targets, args.target
        self.folder = Path(args.output_dir) / "visualizations"
        self.inputs: dict[str, torch.Tensor] | None = None

    def remember(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = inputs

    def __call__(self, state) -> dict[str, float]:
        if self.inputs is None or not self.accelerator.is_main_process:
            return {}
        from bevt.visualization import pretraining_picture, render_panels

        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        # eager even under --torch_compile: an eval-mode call would otherwise compile the encoder once more
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            output = model(**self.inputs, return_logits=True)
        model.train(was_training)
        self.folder.mkdir(parents=True, exist_ok=True)
        tokenizer = self.targets if self.target == "tokenizer" else None
        for stream, prefix, logits in (
            ("video", "", output.logits),
            ("image", "image_", output.image_logits),
        ):
            if logits is None:
                continue
            panels = render_panels(
                self.inputs[f"{prefix}pixel_values"],
                self.inputs[f"{prefix}bool_masked_pos"],
                self.inputs[f"{prefix}labels"],
                logits,
                self.target,
                patch_size=model.config.target_patch_size,
                tokenizer=tokenizer,
            )
            picture = pretraining_picture(panels)
            picture.save(self.folder / f"step-{state.step:06d}-{stream}.png")
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    image = np.asarray(picture)[None]
                    tracker.log_images({f"pictures/{stream}": image}, step=state.step, dataformats="NHWC")
        logger.info(f"pictures of step {state.step} in {self.folder}")
        return {}


def write_training_results(
    args: PretrainingArguments, state: TrainState, target_description: str
) -> dict[str, Any]:
    """`<output_dir>/training_results.json` (main process): stage, steps, samples seen per stream, the first step's
    and the last logging window's metrics, and the targets; returns what it wrote."""
    results = {
        "stage": args.stage,
        "steps": state.step,
        "samples": {k: v for k, v in state.samples.items() if v},
        "first": state.first_metrics,
        "final_window": state.last_window,
        "demo": args.demo,
        "target": args.target,
        "target_description": target_description,
    }
    if args.target == "tokenizer":
        results["tokenizer"] = args.tokenizer_name_or_path or "random (--random_tokenizer)"
    Path(args.output_dir, "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
