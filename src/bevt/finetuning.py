"""Fine-tuning a BEVT folder for video classification: which architecture the run uses and how the model is loaded.

- `resolve_architecture`: which window, clip length, input size and drop path a run uses: a pretrained model's
  own values unless a flag (or an official recipe's documented change, e.g. SSv2's 16x7x7 window) says otherwise.
- `load_model_for_finetuning`: a `BEVTForVideoClassification` from any BEVT folder (pretraining output, converted
  official checkpoint, earlier fine-tuning run), with new labels and, when `window_size` differs, the relative
  position bias tables resized as the official code does (trilinear over the offset volume, e.g. 8x7x7 -> 16x7x7).
- `freeze_unused_video_parameters`: the image-stream patch embedding and the mask token, unused for videos.
- `freeze_backbone` / `folded_classifier`: head-only training and the linear probe (BatchNorm + linear on frozen
  features), exported as a plain classifier.
- `find_label_names`: the class names of a run (a label file, a model's `id2label`, or the files next to the shards);
  `check_shards_exist` / `check_label_ids`: the shards exist and agree with the class names, checked before training;
  `resolve_label_names`: all of that for a `run_finetuning.py` run.
- `Exporter`: a fine-tuning run's Hub-ready folder (weights, video processor, evaluation report, model card).

The training side (layer-wise lr decay, EMA, multi-view evaluation, the loop) is in `bevt.training`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.logging import get_logger
from torch import nn

from .configuration_bevt import BEVTConfig
from .modeling_bevt import BEVTForVideoClassification, BEVTModel

if TYPE_CHECKING:
    from .training.finetuning_arguments import FinetuningArguments

logger = get_logger(__name__)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ArchitectureChoice",
    "Exporter",
    "FINETUNING_CONFIG_FIELDS",
    "LoadReport",
    "RecipeChange",
    "Shards",
    "check_label_ids",
    "check_shards_exist",
    "find_label_names",
    "folded_classifier",
    "freeze_backbone",
    "freeze_unused_video_parameters",
    "load_model_for_finetuning",
    "resolve_architecture",
    "resolve_label_names",
    "skipped_recipe_changes",
]


def freeze_unused_video_parameters(model: BEVTForVideoClassification) -> list[str]:
    """Freeze what video classification never uses (the image-stream patch embedding and the mask token), so the
    optimizer skips them and DDP finds no unused parameters. Returns the frozen names."""
    frozen = []
    for name, param in model.named_parameters():
        if ".image_projection." in name or ".image_norm." in name or name.endswith("embeddings.mask_token"):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def training_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy of a training batch: logits `(B, num_labels)` against class ids `(B,)`, or against the dominant class
    (argmax) of soft targets `(B, num_labels)` from mixup / cutmix / label smoothing. A mixed clip whose mixing weight
    favours its partner is the partner's class (mixup draws lambda ~ Beta(alpha, alpha): below 0.5 half the time), so
    scoring it against its own label would count right answers as wrong."""
    reference = targets.argmax(-1) if targets.is_floating_point() else targets
    return (logits.detach().argmax(-1) == reference).float().mean()


def freeze_backbone(model: BEVTForVideoClassification, batchnorm: bool = False) -> int:
    """Freeze every backbone parameter (`model.bevt`) for head-only training or linear probing; returns how many
    tensors were frozen. With `batchnorm` (the MAE / VideoMAE linear probe), the classifier becomes
    `Sequential(BatchNorm1d(hidden, affine=False), Linear)`: the pooled features are standardised with their batch
    statistics (running statistics in eval mode); `folded_classifier` turns it back into one Linear for export.
    Keep the backbone in eval mode while training (no drop path): the step calls `model.bevt.eval()`."""
    frozen = 0
    for param in model.bevt.parameters():
        frozen += int(param.requires_grad)
        param.requires_grad_(False)
    if batchnorm and isinstance(model.classifier, nn.Linear):
        linear = model.classifier
        norm = nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6).to(linear.weight.device)
        model.classifier = nn.Sequential(norm, linear)
    return frozen


@contextmanager
def folded_classifier(model: BEVTForVideoClassification) -> Iterator[BEVTForVideoClassification]:
    """While the block runs, a linear-probe classifier `BatchNorm1d (no affine) -> Linear` is replaced by the single
    `Linear` that computes the same in eval mode (`W / sigma`, `b - W mu / sigma` with the running statistics), so
    `save_pretrained` writes a plain `BEVTForVideoClassification`; other classifiers are left as they are."""
    head = model.classifier
    if not (isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], nn.BatchNorm1d)):
        yield model
        return
    norm, linear = head
    with torch.no_grad():
        inv_std = torch.rsqrt(norm.running_var.float() + norm.eps)
        weight = linear.weight.float() * inv_std
        bias = linear.bias.float() - weight @ norm.running_mean.float()
        folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device, linear.weight.dtype)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    model.classifier = folded
    try:
        yield model
    finally:
        model.classifier = head


# ---------------------------------------------------------------------------------------------------------------
# Loading a model for fine-tuning
# ---------------------------------------------------------------------------------------------------------------

# Config fields that may change when fine-tuning a pretrained model (the rest define the weights' shapes).
FINETUNING_CONFIG_FIELDS: tuple[str, ...] = (
    "window_size",
    "num_frames",
    "image_size",
    "drop_path_rate",
    "classifier_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


@dataclass
class LoadReport:
    """What `load_model_for_finetuning` did."""

    source: str
    source_architecture: str | None = None
    classifier: str = "new"  # "new" (random init) or "loaded" (same labels as the source)
    window_resized: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    frozen: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"backbone from {self.source} ({self.source_architecture or 'unknown class'})"]
        parts.append("classifier loaded (same labels)" if self.classifier == "loaded" else "new classifier")
        if self.window_resized:
            source, target = ("x".join(map(str, w)) for w in self.window_resized)
            parts.append(f"relative position bias resized {source} -> {target}")
        if self.frozen:
            parts.append(f"{len(self.frozen)} image-stream/mask-token tensors frozen (unused for videos)")
        return "; ".join(parts)


def _label_config(label_names: Sequence[str]) -> dict[str, Any]:
    if len(label_names) < 2:
        raise ValueError(f"need at least 2 class names, got {len(label_names)}")
    if len(set(label_names)) != len(label_names):
        duplicates = sorted({n for n in label_names if list(label_names).count(n) > 1})
        raise ValueError(f"class names must be unique; repeated: {duplicates[:5]}")
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _same_labels(config: BEVTConfig, label_names: Sequence[str]) -> bool:
    labels = getattr(config, "id2label", None) or {}
    return len(labels) == len(label_names) and all(labels.get(i) == n for i, n in enumerate(label_names))


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence Transformers' loading report (warnings) inside the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model_for_finetuning(
    name_or_path: str | Path,
    label_names: Sequence[str],
    **config_updates: Any,
) -> tuple[BEVTForVideoClassification, LoadReport]:
    """A `BEVTForVideoClassification` initialised from a saved BEVT folder (any head) for `label_names`.

    Args:
        name_or_path: a `save_pretrained` folder (or Hub id) of any BEVT model class.
        label_names: class names in index order. When the source is a classifier with the very same labels, its
            classifier is kept; otherwise a new one is initialised.
        config_updates: fields of `FINETUNING_CONFIG_FIELDS` to change (e.g. `window_size=(16, 7, 7)`,
            `drop_path_rate=0.4`). A new `window_size` resizes every relative position bias table.

    Raises:
        ValueError: an update of a field that defines weight shapes, or a source that is not a BEVT model.
    """
    bad = sorted(set(config_updates) - set(FINETUNING_CONFIG_FIELDS))
    if bad:
        raise ValueError(
            f"cannot change {bad} of a pretrained model (they define its weights); changeable: "
            f"{list(FINETUNING_CONFIG_FIELDS)}"
        )
    source_config = BEVTConfig.from_pretrained(name_or_path)
    if getattr(source_config, "model_type", None) != BEVTConfig.model_type:
        raise ValueError(f"{name_or_path} is not a BEVT model (model_type {source_config.model_type!r})")
    architecture = (source_config.architectures or [None])[0]
    config = copy.deepcopy(source_config)
    for key, value in config_updates.items():
        setattr(config, key, value)
    # problem_type None: hard labels and soft (mixup / smoothing) targets both work (the loss picks per call).
    config = BEVTConfig(
        **{**config.to_dict(), **_label_config(label_names), "architectures": None, "problem_type": None}
    )
    model = BEVTForVideoClassification(config)

    from .training.arguments import check_loaded_weights

    with _quiet_transformers():  # the head of the source is "unexpected" for BEVTModel: expected here
        backbone, info = BEVTModel.from_pretrained(name_or_path, output_loading_info=True)
    check_loaded_weights(backbone, info, what="BEVT backbone")
    state = backbone.state_dict()
    report = LoadReport(source=str(name_or_path), source_architecture=architecture)
    source_window, target_window = tuple(source_config.window_size), tuple(config.window_size)
    if source_window != target_window:
        from .conversion_swin import resize_relative_position_bias

        for key in state:
            if key.endswith("relative_position_bias_table"):
                state[key] = resize_relative_position_bias(state[key], source_window, target_window)
        report.window_resized = (source_window, target_window)
    model.bevt.load_state_dict(state, strict=True)
    del backbone

    if architecture == "BEVTForVideoClassification" and _same_labels(source_config, label_names):
        with _quiet_transformers():
            source = BEVTForVideoClassification.from_pretrained(name_or_path)
        model.classifier.load_state_dict(source.classifier.state_dict())
        report.classifier = "loaded"
    report.frozen = freeze_unused_video_parameters(model)
    return model, report


# ---------------------------------------------------------------------------------------------------------------
# Which architecture a fine-tuning run uses
# ---------------------------------------------------------------------------------------------------------------

# Settings a saved model carries that fine-tuning can change without changing weight shapes; a pretrained model's
# own values win over recipe defaults (a window or clip length it was not pretrained with costs accuracy).
ARCHITECTURE_FIELDS: tuple[str, ...] = ("window_size", "num_frames", "image_size", "drop_path_rate")


@dataclass(frozen=True)
class RecipeChange:
    """An architecture change an official fine-tuning recipe makes to the pretrained model it starts from, e.g.
    SSv2's window 8x7x7 -> 16x7x7. It applies only to models that have `source` (the official pretraining's value)."""

    source: Any
    target: Any
    reason: str


@dataclass(frozen=True)
class ArchitectureChoice:
    """The value one architecture field gets in a fine-tuning run and why."""

    name: str
    value: Any
    pretrained: Any = None  # the model folder's value (None when training from scratch)
    origin: str = "recipe"  # "pretrained" | "flag" | "recipe"
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.pretrained is not None and self.value != self.pretrained

    def describe(self) -> str:
        """One line for the log: what changed, from, to, why and what it may cost ("" when nothing changed)."""
        if not self.changed:
            return ""
        line = f"{self.name} {_show(self.pretrained)} -> {_show(self.value)} ({self.reason})"
        cost = _CHANGE_COSTS.get(self.name, "")
        if self.origin == "flag" and cost:
            line += f": {cost}; omit --{self.name} to keep the pretrained {_show(self.pretrained)}"
        elif self.name == "window_size":
            line += ": relative position bias tables resized"
        return line

    def card_text(self) -> str:
        """`8x7x7 (pretrained model)`, `16x7x7 (changed from 8x7x7: ssv2 recipe)`: for the model card."""
        if self.pretrained is None:
            return f"{_show(self.value)} ({self.reason})"
        if not self.changed:
            return f"{_show(self.value)} (pretrained model)"
        return f"{_show(self.value)} (changed from {_show(self.pretrained)}: {self.reason})"


_CHANGE_COSTS = {
    "window_size": "the relative position bias tables are resized to a window the model was not pretrained "
    "with, which can cost accuracy",
    "num_frames": "clips of another length than in pretraining change what the temporal windows see, which can "
    "cost accuracy",
    "image_size": "another input size than in pretraining changes the scale of what the windows see, which can "
    "cost accuracy",
}


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _normalise(name: str, value: Any) -> Any:
    return tuple(int(v) for v in value) if name == "window_size" else value


def resolve_architecture(
    pretrained: BEVTConfig | None,
    flags: Mapping[str, Any],
    recipe_values: Mapping[str, Any],
    recipe_changes: Mapping[str, RecipeChange] | None = None,
    recipe_name: str = "recipe",
) -> dict[str, ArchitectureChoice]:
    """Window, clip length, input size and drop path of a fine-tuning run (`ARCHITECTURE_FIELDS`).

    From scratch (`pretrained` None): a flag, else the recipe's value. From a pretrained model: a flag (the change
    is reported with what it may cost), else the recipe's documented change when the model has the value the
    official recipe starts from (e.g. ssv2: window 8x7x7 -> 16x7x7), else **the model's own value**.

    Args:
        pretrained: the config of the model folder fine-tuning starts from, or None.
        flags: the fields given explicitly on the command line (name -> value); absent fields were not given.
        recipe_values: the recipe's value of every field (used from scratch).
        recipe_changes: the recipe's documented changes to pretrained models, by field.
        recipe_name: shown in the reasons ("ssv2 recipe").
    """
    choices: dict[str, ArchitectureChoice] = {}
    for name in ARCHITECTURE_FIELDS:
        if pretrained is None:
            if name in flags:
                choices[name] = ArchitectureChoice(
                    name, _normalise(name, flags[name]), None, "flag", f"--{name}"
                )
            else:
                value = _normalise(name, recipe_values[name])
                choices[name] = ArchitectureChoice(name, value, None, "recipe", f"{recipe_name} recipe")
            continue
        own = _normalise(name, getattr(pretrained, name))
        change = (recipe_changes or {}).get(name)
        if name in flags:
            choices[name] = ArchitectureChoice(name, _normalise(name, flags[name]), own, "flag", f"--{name}")
        elif change is not None and _normalise(name, change.source) == own:
            target = _normalise(name, change.target)
            choices[name] = ArchitectureChoice(
                name, target, own, "recipe", f"{recipe_name} recipe: {change.reason}"
            )
        else:
            choices[name] = ArchitectureChoice(name, own, own, "pretrained", "pretrained model")
    return choices


def skipped_recipe_changes(
    pretrained: BEVTConfig,
    flags: Mapping[str, Any],
    recipe_changes: Mapping[str, RecipeChange],
    recipe_name: str = "recipe",
) -> list[str]:
    """Log lines for the recipe changes that did not apply: the model does not have the official starting value."""
    lines = []
    for name, change in recipe_changes.items():
        own = _normalise(name, getattr(pretrained, name))
        if name not in flags and own != _normalise(name, change.source):
            lines.append(
                f"{recipe_name} recipe: the official fine-tuning changes {name} {_show(change.source)} -> "
                f"{_show(change.target)}; this model has {_show(own)}, kept (pass --{name} to change it)"
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------


def find_label_names(
    label_file: str | Path | None,
    shards: Sequence[str] | None = None,
    model_config: BEVTConfig | None = None,
) -> list[str]:
    """Class names in label-index order: from `label_file` (one per line), else `model_config.id2label`, else the
    `labels.txt` or `dataset_info.json` next to the first of `shards`.

    Raises:
        UsageError: naming `--label_names`, when no names are found, fewer than 2, or repeated ones.
    """
    from .data.shards import find_label_names as names_next_to_shards
    from .data.shards import read_labels
    from .training.arguments import fail

    if label_file:
        names, source = read_labels(label_file), str(label_file)
    elif model_config is not None:
        names, source = (
            [model_config.id2label[i] for i in range(model_config.num_labels)],
            "the model's id2label",
        )
    else:
        names, source = names_next_to_shards(list(shards or [])) if shards else ([], None)
        if not names:
            fail(
                "--label_names",
                "given: no labels.txt or labels in dataset_info.json next to the shards",
                None,
            )
    if len(names) < 2:
        fail("--label_names", "a file with at least 2 class names", source)
    if len(set(names)) != len(names):
        fail("--label_names", "a file of unique class names", source)
    return names


def dataset_name_from_shards(
    shard_sets: Sequence[Any], storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The dataset the shards record (`dataset_name` in the `dataset_info.json` next to the first shard of each
    given set, as `make_shards --dataset-name` writes it), for the model card of a run without `--dataset_name`;
    None when none records one or the sets record different ones (the card then claims no dataset)."""
    from .data.shards import list_shards, load_dataset_info

    names = set()
    for shards in shard_sets:
        if not shards:
            continue
        try:
            first = list_shards(shards, storage_options=storage_options)[0]
            info = load_dataset_info(first, storage_options=storage_options) or {}
        except (OSError, ValueError, IndexError, ImportError):
            continue
        if isinstance(info.get("dataset_name"), str) and info["dataset_name"]:
            names.add(info["dataset_name"])
    return names.pop() if len(names) == 1 else None


def check_shards_exist(flags: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> None:
    """Each `{flag: shards}` that is given resolves to shard files (a folder of `.tar`, a glob, files, URLs), else a
    `UsageError` naming the flag; checked before anything reads labels or builds a model."""
    from .data.shards import list_shards
    from .training.arguments import UsageError

    for flag, shards in flags.items():
        if not shards:
            continue
        try:
            list_shards(shards, storage_options=storage_options)
        except (OSError, ValueError, ImportError) as err:
            raise UsageError(f"{flag}: {err}") from None


def check_label_ids(
    label_names: Sequence[str],
    shard_sets: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Before training: the shard sets (`{flag: shards}`, e.g. train and validation) and the run's class names give
    every class the same id, and no label id lies beyond the names (`check_label_consistency`). The samples of
    local shards are read too (tar headers and `.json` members only); remote shards are compared through the
    `dataset_info.json` / `labels.txt` next to them. A mismatch is a `UsageError` that names the class, both ids and
    where each was seen."""
    from .data.shards import LabelMismatchError, check_label_consistency
    from .data.storage import is_url
    from .training.arguments import UsageError

    given = {flag: shards for flag, shards in shard_sets.items() if shards}
    files = [str(f) for s in given.values() for f in ([s] if isinstance(s, str | Path) else s)]
    try:
        check_label_consistency(
            *given.values(),
            label_names=list(label_names),
            scan_samples=not any(is_url(f) for f in files),
            storage_options=storage_options,
        )
    except LabelMismatchError as err:
        raise UsageError(f"{' / '.join(given)} and the class names disagree: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# A fine-tuning run's class names and its Hub-ready export (used by run_finetuning.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Shards:
    """A fine-tuning run's data: its training and validation shards and its class-names file (`--label_names`)."""

    train: list[str] | None
    validation: list[str] | None
    label_names: str | None


def resolve_label_names(
    args: FinetuningArguments, shards: Shards, model_config: BEVTConfig | None = None
) -> list[str]:
    """Class names: --label_names, else the model's (eval only), else labels.txt / dataset_info.json of the shards;
    refuses shards whose label ids disagree with them; warns when the recipe's dataset has another number of classes."""
    names = find_label_names(
        shards.label_names, shards.train or shards.validation, model_config if args.do_eval_only else None
    )
    if not args.do_eval_only:  # (evaluation compares ids with the model's classes, whatever their names)
        sets = {"--train_shards": shards.train, "--validation_shards": shards.validation}
        check_label_ids(names, sets, args.stream_options()["storage_options"])
    expected = args.active_recipe.num_labels
    if not args.demo and not args.do_eval_only and expected and len(names) != expected:
        logger.warning(
            f"the {args.recipe} recipe is made for {expected} classes; the labels have {len(names)}"
        )
    return names


class Exporter:
    """Writes the Hub-ready folder: weights + config, video processor, eval results, confusion matrix, model card."""

    def __init__(
        self, args: FinetuningArguments, label_names: list[str], num_views: tuple[int, int] | None
    ) -> None:
        self.args, self.label_names, self.num_views = args, label_names, num_views
        self.hyperparameters: dict[str, Any] = {}
        self.last_report: dict[str, Any] | None = None  # of the latest evaluation (main process)
        self._flops: int | None = None

    def flops(self, model: torch.nn.Module) -> int | None:
        if self._flops is None:
            from .modelcard import count_flops_per_view

            try:
                self._flops = count_flops_per_view(model)
            except Exception as err:  # noqa: BLE001 - the card can do without it
                logger.warning(f"could not count FLOPs per view: {err}")
        return self._flops

    def export(
        self, model: BEVTForVideoClassification, metrics: dict[str, float] | None, report: dict | None
    ) -> None:
        """Main process only. A linear probe's BatchNorm is folded into its linear layer for the export."""
        with folded_classifier(model) as plain:
            self._export(plain, metrics, report)

    def _export(
        self, model: BEVTForVideoClassification, metrics: dict[str, float] | None, report: dict | None
    ) -> None:
        from .modelcard import build_model_card
        from .training.evaluation import write_eval_outputs

        args, out = self.args, Path(self.args.output_dir)
        model.save_pretrained(out)
        args.video_processor().save_pretrained(out)
        if report is not None:
            write_eval_outputs(out, report, self.label_names, f"{out.name}")
        local = args.model_name_or_path and os.path.exists(args.model_name_or_path)
        card = build_model_card(
            model_name=Path(args.hub_model_id or out.resolve().name).name,
            config=model.config,
            pipeline_tag="video-classification",
            tags=["video-classification", "bevt-finetuned"] + (["demo"] if args.demo else []),
            datasets=[args.dataset_name] if args.dataset_name else (),
            base_model=args.base_model or (None if local else args.model_name_or_path),
            eval_results=metrics,
            eval_dataset=args.card_eval_dataset() if metrics else None,
            num_views=self.num_views,
            flops_per_view=self.flops(model),
            num_parameters=sum(p.numel() for p in model.parameters()),
            hyperparameters=self.hyperparameters,
            repo_id=args.hub_model_id,
        )
        card.save(out / "README.md")
