"""Hub model cards for BEVT folders (pretraining and fine-tuning outputs) and FLOPs counting.

`build_model_card(...)` returns a `huggingface_hub.ModelCard` whose YAML header carries the Hub metadata
(`library_name: transformers`, `pipeline_tag`, tags, datasets, base model, license) and, when evaluation results
are given, a `model-index` entry per metric; the body describes the model (architecture, clip, views, FLOPs per
view), how to use it, the evaluation and the training setup.

    card = build_model_card(
        model_name="bevt-base-k400",
        config=model.config,
        pipeline_tag="video-classification",
        datasets=["kinetics400"],
        eval_results={"top1_accuracy": 0.81, "top5_accuracy": 0.95},
        eval_dataset=EvalDataset(name="Kinetics-400", type="kinetics400", split="validation"),
        num_views=(4, 3),
        flops_per_view=count_flops_per_view(model),
    )
    card.save("output_dir/README.md")
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = [
    "METRIC_NAMES",
    "EvalDataset",
    "build_model_card",
    "build_tokenizer_model_card",
    "count_flops_per_view",
    "format_flops",
]

# Display names and Hub metric types of the metrics `bevt.metrics.video_accuracy` reports.
METRIC_NAMES: dict[str, tuple[str, str]] = {
    "top1_accuracy": ("Top-1 accuracy", "accuracy"),
    "top5_accuracy": ("Top-5 accuracy", "top_5_accuracy"),
    "mean_class_accuracy": ("Mean class accuracy", "mean_class_accuracy"),
}

_CITATION = """@inproceedings{wang2022bevt,
  title     = {BEVT: BERT Pretraining of Video Transformers},
  author    = {Wang, Rui and Chen, Dongdong and Wu, Zuxuan and Chen, Yinpeng and Dai, Xiyang and Liu, Mengchen and
               Jiang, Yu-Gang and Zhou, Luowei and Yuan, Lu},
  booktitle = {CVPR},
  year      = {2022}
}"""

_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Model

{{ architecture }}

## How to use

{{ usage }}
{% if evaluation %}
## Evaluation

{{ evaluation }}
{% endif %}{% if training %}
## Training

{{ training }}
{% endif %}
## Citation

```bibtex
{{ citation }}
```
"""


@dataclass(frozen=True)
class EvalDataset:
    """The dataset the evaluation results were measured on (for `model-index`)."""

    name: str
    type: str
    split: str | None = None
    config: str | None = None


def count_flops_per_view(
    model: torch.nn.Module, num_frames: int | None = None, image_size: int | None = None
) -> int:
    """FLOPs of one forward pass on one view `(1, T, 3, S, S)` (T, S from the model config by default).

    Counted with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2 FLOPs, so GMACs = GFLOPs / 2) on a
    copy of the model with eager attention (fused SDPA kernels are not counted by the flop counter), on the `meta`
    device when possible (no compute), else on the model's device. The model itself is not touched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = model.config
    frames = num_frames or config.num_frames
    size = image_size or config.image_size
    channels = getattr(config, "num_channels", 3)

    def run(module: torch.nn.Module, device: torch.device | str) -> int:
        pixel_values = torch.zeros(1, frames, channels, size, size, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(pixel_values=pixel_values)
        return int(counter.get_total_flops())

    counted = copy.deepcopy(model).eval()
    if hasattr(counted, "set_attn_implementation"):
        # Fused SDPA kernels (CPU flash attention) are invisible to FlopCounterMode: count the explicit matmuls.
        counted.set_attn_implementation("eager")
    try:
        return run(copy.deepcopy(counted).to("meta"), "meta")
    except Exception:  # noqa: BLE001 - some ops have no meta kernel: count on a real copy
        return run(counted, next(counted.parameters()).device)


def format_flops(flops: float) -> str:
    """`282.4 GFLOPs` style, with an adaptive unit."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOPs"


def _metric_label(name: str) -> tuple[str, str]:
    return METRIC_NAMES.get(name, (name.replace("_", " ").capitalize(), name))


def _architecture(
    config: Any, num_views: tuple[int, int] | None, flops_per_view: int | None, num_parameters: int | None
) -> str:
    depths = "-".join(str(d) for d in config.depths)
    lines = [
        f"- Backbone: Video Swin Transformer (BEVT encoder), embed dim {config.embed_dim}, depths {depths}, "
        f"heads {'-'.join(str(h) for h in config.num_heads)}, window {'x'.join(str(w) for w in config.window_size)}, "
        f"patch {'x'.join(str(p) for p in config.patch_size)}",
        f"- Input: {config.num_frames} frames of {config.image_size}x{config.image_size} pixels per view",
    ]
    if num_parameters is not None:
        lines.append(f"- Parameters: {num_parameters / 1e6:.2f}M")
    if flops_per_view is not None:
        lines.append(
            f"- FLOPs per view: {format_flops(flops_per_view)} = {flops_per_view / 2e9:.2f} G multiply-adds (the number "
            "papers such as Video Swin and BEVT report as FLOPs); counted with `torch.utils.flop_counter`"
        )
    if num_views is not None:
        clips, crops = num_views
        lines.append(
            f"- Views at test time: {clips} clip(s) x {crops} crop(s) = {clips * crops}, softmax scores averaged"
        )
    labels = getattr(config, "id2label", None) or {}
    if (
        labels
        and getattr(config, "num_labels", 0) > 0
        and not all(str(v).startswith("LABEL_") for v in labels.values())
    ):
        shown = ", ".join(f"`{labels[i]}`" for i in sorted(labels)[:8])
        more = f" ... ({len(labels)} classes)" if len(labels) > 8 else f" ({len(labels)} classes)"
        lines.append(f"- Classes: {shown}{more}")
    return "\n".join(lines)


def _usage(pipeline_tag: str | None, repo_hint: str) -> str:
    if pipeline_tag == "video-classification":
        return f"""The folder carries its model and video-processor code, so it works without installing `bevt`:

```python
from transformers import pipeline

classifier = pipeline("video-classification", model="{repo_hint}", trust_remote_code=True)
classifier("video.mp4", top_k=5)  # [{{"label": ..., "score": ...}}, ...]
```

With `bevt` installed, `import bevt` registers the classes and `trust_remote_code` is not needed. Multi-view scoring
as in the evaluation below:

```python
import torch
from transformers import AutoModelForVideoClassification, AutoVideoProcessor

model = AutoModelForVideoClassification.from_pretrained("{repo_hint}", trust_remote_code=True).eval()
processor = AutoVideoProcessor.from_pretrained("{repo_hint}", trust_remote_code=True)
inputs = processor("video.mp4", num_clips=4, num_crops=3, return_tensors="pt")  # 12 views + num_views
with torch.no_grad():
    scores = model(**inputs).logits.softmax(-1)  # (1, num_labels): the mean of the 12 views' softmax scores
```"""
    return f"""```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo_hint}", trust_remote_code=True)  # the encoder
```

Fine-tune it on labelled videos with `run_finetuning.py --model_name_or_path {repo_hint}` of the `bevt` package."""


def _evaluation(
    eval_results: Mapping[str, float], eval_dataset: EvalDataset | None, num_views: tuple[int, int] | None
) -> str:
    where = (
        f" on {eval_dataset.name}" + (f" ({eval_dataset.split})" if eval_dataset.split else "")
        if eval_dataset
        else ""
    )
    views = f", {num_views[0]} clip(s) x {num_views[1]} crop(s) per video" if num_views else ""
    rows = "\n".join(f"| {_metric_label(k)[0]} | {100 * v:.2f} |" for k, v in eval_results.items())
    return f"Results{where}{views}:\n\n| metric | % |\n|---|---|\n{rows}"


def _training(hyperparameters: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyperparameters.items())
    return f"| hyperparameter | value |\n|---|---|\n{rows}"


def build_model_card(
    *,
    model_name: str,
    config: Any,
    pipeline_tag: str | None = None,
    summary: str | None = None,
    tags: Sequence[str] = (),
    datasets: Sequence[str] = (),
    base_model: str | None = None,
    license: str = "apache-2.0",
    eval_results: Mapping[str, float] | None = None,
    eval_dataset: EvalDataset | None = None,
    num_views: tuple[int, int] | None = None,
    flops_per_view: int | None = None,
    num_parameters: int | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """A Hub model card for a BEVT model folder.

    Args:
        model_name: title and `model-index` name.
        config: the model's `BEVTConfig` (architecture, clip length, image size, labels).
        pipeline_tag: e.g. `"video-classification"` for fine-tuned models; None for pretraining checkpoints.
        summary: a paragraph under the title (default: one naming the model class and BEVT).
        tags, datasets, base_model, license: Hub metadata (`bevt`, `video` and `video-swin` tags are always added).
        eval_results: `{metric: value in [0, 1]}` (e.g. from `bevt.metrics.video_accuracy`); each becomes a
            `model-index` result (needs `eval_dataset` and `pipeline_tag`). None for cards without evaluation.
        eval_dataset: the evaluation dataset.
        num_views: `(clips, crops)` per video at test time.
        flops_per_view: FLOPs of one view (`count_flops_per_view`).
        num_parameters: parameter count shown in the card.
        hyperparameters: training settings shown as a table.
        repo_id: the Hub repository name used in the usage snippets (default: `model_name`).

    Raises:
        ValueError: evaluation results without a dataset or task, or a metric value outside [0, 1].
    """
    eval_entries = None
    if eval_results:
        if eval_dataset is None or pipeline_tag is None:
            raise ValueError("eval_results need eval_dataset and pipeline_tag (the model-index task)")
        for key, value in eval_results.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"metric {key!r} must be a fraction in [0, 1], got {value!r}")
        metric_args = {"num_clips": num_views[0], "num_crops": num_views[1]} if num_views else None
        eval_entries = [
            EvalResult(
                task_type=pipeline_tag,
                task_name=pipeline_tag.replace("-", " ").capitalize(),
                dataset_type=eval_dataset.type,
                dataset_name=eval_dataset.name,
                dataset_split=eval_dataset.split,
                dataset_config=eval_dataset.config,
                metric_type=_metric_label(key)[1],
                metric_name=_metric_label(key)[0],
                metric_value=round(float(value), 6),
                metric_args=metric_args,
            )
            for key, value in eval_results.items()
        ]
    all_tags = list(dict.fromkeys(["bevt", "video", "video-swin", *tags]))
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=all_tags,
        datasets=list(datasets) or None,
        base_model=base_model,
        metrics=[_metric_label(k)[1] for k in eval_results] if eval_results else None,
        eval_results=eval_entries,
    )
    model_class = "BEVTForVideoClassification" if pipeline_tag == "video-classification" else "BEVT"
    default_summary = (
        f"A `{model_class}` model of the `bevt` package (BEVT: BERT Pretraining of Video Transformers, "
        "Wang et al., CVPR 2022), in the Hugging Face Transformers format. The folder carries its modeling code "
        "(`auto_map`), so it loads with `trust_remote_code=True` without installing `bevt`."
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        model_name=model_name,
        summary=summary or default_summary,
        architecture=_architecture(config, num_views, flops_per_view, num_parameters),
        usage=_usage(pipeline_tag, repo_id or model_name),
        evaluation=_evaluation(eval_results, eval_dataset, num_views) if eval_results else "",
        training=_training(hyperparameters) if hyperparameters else "",
        citation=_CITATION,
    )


def build_tokenizer_model_card(
    *,
    model_name: str,
    config: Any,
    summary: str,
    evaluation: str | None = None,
    num_parameters: int | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A Hub model card for a trained `BEVTVisualTokenizer` folder (`run_tokenizer_training.py`).

    Args:
        model_name: title.
        config: the tokenizer's `BEVTVisualTokenizerConfig`.
        summary: a paragraph under the title.
        evaluation: markdown of the held-out results (None: no evaluation section).
        num_parameters, hyperparameters, repo_id, license: as in `build_model_card`.
    """
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license=license,
        tags=["bevt", "visual-tokenizer", config.tokenizer_type, "image-tokenization"],
    )
    size, factor = config.image_size, config.downsample_factor
    kind = "VQGAN (nearest-code quantizer)" if config.tokenizer_type == "vqgan" else "DALL-E dVAE"
    lines = [
        f"- `BEVTVisualTokenizer`, {kind}, {config.vocab_size} codes, {factor}x downsampling, "
        f"{'with' if config.has_decoder else 'without'} a decoder",
        f"- Input: RGB in [0, 1], {size}x{size} pixels -> {size // factor}x{size // factor} token ids",
    ]
    if num_parameters is not None:
        lines.append(f"- Parameters: {num_parameters / 1e6:.2f}M (encoder and decoder)")
    repo = repo_id or model_name
    usage = f"""```python
import bevt  # registers the classes
from bevt import BEVTVisualTokenizer

tokenizer = BEVTVisualTokenizer.from_pretrained("{repo}")
ids = tokenizer.get_codebook_indices(frames)   # (B, 3, {size}, {size}) in [0, 1] -> (B, {size // factor}, {size // factor})
pixels = tokenizer.decode(ids)                  # -> (B, 3, {size}, {size}) in [0, 1]
```

As the pretraining targets of BEVT: `run_pretraining.py --tokenizer_name_or_path {repo} --tokenizer_size {size}` (one
token per 16-px patch of a {size * 16 // factor} px model input)."""
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        model_name=model_name,
        summary=summary,
        architecture="\n".join(lines),
        usage=usage,
        evaluation=evaluation or "",
        training=_training(hyperparameters) if hyperparameters else "",
        citation=_CITATION,
    )
