"""Typed command-line arguments for the training scripts: dataclasses parsed by `transformers.HfArgumentParser`.

The flags every script shares are declared once here, in groups (`ModelArguments`, `DataLoadingArguments`,
`ComputeArguments`, `OptimizerArguments`, `ScheduleArguments`, `CheckpointArguments`, `TrackingArguments`, `HubArguments`,
`RunControlArguments`); a script's arguments class inherits them next to its own groups, and each group checks its
values in `__post_init__` (errors read `error: --flag must be <expected>, got <value>` and exit with status 2).

Recipes: a field left `None` on the command line is filled from the script's active recipe (a frozen dataclass
instance, e.g. the k400 fine-tuning recipe or the pretraining demo) before the checks run; `--help` shows every
recipe's value next to the flag.

    parser = BEVTArgumentParser(FinetuningArguments, description="...")
    args = parser.parse(argv)          # --config run.yaml|run.json, then the command line (which wins)
    save_training_args(args, args.output_dir)   # training_args.json, every *_token field masked
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg

from ..configuration_bevt import PRESETS, BEVTConfig

__all__ = [
    "MASKED",
    "SCHEDULERS",
    "ArgumentGroup",
    "BEVTArgumentParser",
    "CheckpointArguments",
    "ComputeArguments",
    "FLAG_NAMES",
    "DataLoadingArguments",
    "HelpFormatter",
    "HubArguments",
    "ModelArguments",
    "OptimizerArguments",
    "Recipe",
    "RecipeArguments",
    "RunControlArguments",
    "ScheduleArguments",
    "TrackingArguments",
    "UsageError",
    "arguments_dict",
    "check_resumed_arguments",
    "check_loaded_weights",
    "check_local_source",
    "check_model_folder",
    "check_non_negative",
    "check_positive_ints",
    "check_unit_interval",
    "fail",
    "load_error",
    "parse_config_overrides",
    "missing_folder_reason",
    "save_training_args",
    "tracker_config",
]

# One flag name per meaning across the scripts and the CLIs (issue 17): {field: (name, *other spellings)}. The first
# name leads in `--help` (the field's own name when it is not listed); every spelling, with underscores or dashes,
# parses to the field, in `--config` files too. A field keeps its name in errors and training_args.json. Flags with the
# same spelling but another meaning in another script say so in their help (e.g. --warmup_epochs vs --warmup_ratio).
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "num_warmup_steps": ("num_warmup_steps", "warmup_steps"),  # Transformers' Trainer: warmup_steps
    "max_train_steps": ("max_train_steps", "max_steps"),  # Trainer: max_steps
    "checkpointing_steps": ("checkpointing_steps", "save_steps"),  # Trainer: save_steps
    "num_workers": ("num_workers", "dataloader_num_workers"),  # Trainer: dataloader_num_workers
    "label_smoothing": ("label_smoothing", "label_smoothing_factor"),  # Trainer: label_smoothing_factor
    "sampling": ("sampling_mode", "sampling"),  # the video processor's sampling_mode, convert --sampling-mode
    "label_names": ("label_names", "labels", "id2label"),  # make_shards --labels, convert --id2label
    "num_frames": ("num_frames", "clip_len"),  # the data stack's clip_len
}

SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial")
MASKED = "<hidden>"  # what training_args.json and the trackers get instead of a token


# ---------------------------------------------------------------------------------------------------------------
# Errors and checks
# ---------------------------------------------------------------------------------------------------------------


class UsageError(SystemExit):
    """A wrong flag or config value: `error: <message>`, exit status 2 (`run_script` prints it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith("error: ") else f"error: {message}")
        self.code = 2

    @property
    def message(self) -> str:
        return str(self.args[0])


def fail(flag: str, expected: str, got: Any) -> NoReturn:
    """Raise `UsageError("<flag> must be <expected>, got <value>")`."""
    raise UsageError(f"{flag} must be {expected}, got {got!r}")


def missing_folder_reason(name_or_path: str) -> str | None:
    """Why `name_or_path`, which does not exist locally, must be a missing local folder rather than a Hub repo id,
    or None when it may be a Hub id: it looks like a path (starts with `/`, `./`, `../` or `~`, ends with a
    separator), its parent folder exists here (`outputs/x` next to an `outputs` folder), it cannot be a repo id,
    or the Hub is offline (`HF_HUB_OFFLINE`) and the name is not in the local Hub cache."""
    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text.endswith(("/", "\\")):
        return "a local path"
    parent = Path(text).parent
    if str(parent) not in ("", ".") and parent.is_dir():
        return f"its parent folder {parent} exists here"
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return "and not a Hub repo id"
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(text, "config.json"), str):
        return "and not in the Hub cache: HF_HUB_OFFLINE is set"
    return None


def check_local_source(flag: str, name_or_path: str) -> None:
    """A `from_pretrained` flag's value that is not an existing path: `UsageError("<flag> <value>: no such folder
    (<why>)")` when it cannot be a reachable Hub repo id (`missing_folder_reason`); Hub ids are left to
    `from_pretrained` (instead of Transformers' "Repo id must be in the form ..." for a mistyped local path)."""
    if Path(name_or_path).expanduser().exists():
        return
    reason = missing_folder_reason(name_or_path)
    if reason is not None:
        raise UsageError(f"{flag} {name_or_path}: no such folder ({reason})")


def load_error(flag: str, name_or_path: str, err: BaseException) -> UsageError:
    """The `UsageError` of a failed `from_pretrained(name_or_path)`: the flag, the value and the error; a value that
    is no local path was looked up on the Hub, which says so first ("no such folder, and the Hub ...")."""
    message = " ".join(str(err).split()) or type(err).__name__
    if not Path(name_or_path).expanduser().exists():
        return UsageError(f"{flag} {name_or_path}: no such folder, and the Hub lookup failed: {message}")
    return UsageError(f"{flag} {name_or_path}: {message}")


def check_loaded_weights(
    model: Any, loading_info: Mapping[str, Any], new_ok: Sequence[str] = (), what: str | None = None
) -> None:
    """After `model, info = cls.from_pretrained(..., output_loading_info=True)`: refuse (`ValueError`) a folder that
    left most of the model newly initialised, i.e. whose weights mostly do not fit (a folder of the right
    `model_type` holding another model's weights). `new_ok`: key prefixes the task legitimately adds (a new
    classifier, a new prediction head), not counted. The message says how many tensors were missing, and which."""

    def counted(key: str) -> bool:
        return not key.startswith(tuple(new_ok))

    expected = [k for k in model.state_dict() if counted(k)]
    missing = [k for k in loading_info.get("missing_keys", ()) if counted(k)]
    mismatched = [k if isinstance(k, str) else k[0] for k in loading_info.get("mismatched_keys", ())]
    bad = missing + [k for k in mismatched if counted(k)]
    if expected and 2 * len(bad) > len(expected):
        shown = ", ".join(sorted(bad)[:4]) + (", ..." if len(bad) > 4 else "")
        raise ValueError(
            f"most of its weights do not fit a {what or type(model).__name__}: {len(bad)} of the {len(expected)} "
            f"weight tensors would be newly initialised (missing or of another shape in the folder: {shown}); "
            "pass a folder saved from this kind of model"
        )


def check_model_folder(flag: str, name_or_path: str, model_type: str, what: str) -> None:
    """`name_or_path` of a `from_pretrained` flag: an existing local folder must hold a `config.json` of `model_type`
    (else `UsageError` naming the flag, what the folder is and what was expected); a name that is not an existing
    path must be a possible Hub repo id (`check_local_source`). Hub ids are left to `from_pretrained`."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        check_local_source(flag, name_or_path)
        return
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"{flag} {name_or_path}: not {what} (no config.json in it)")
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise UsageError(f"{flag} {name_or_path}: unreadable config.json ({err})") from None
    if found != model_type:
        raise UsageError(
            f"{flag} {name_or_path}: a folder of model_type {found!r}, expected {what} (model_type {model_type!r})"
        )


def check_positive_ints(args: Any, names: Iterable[str]) -> None:
    """Each `--name` that is set must be an integer >= 1 (a bool is refused)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail(f"--{name}", "a positive integer", value)


def check_non_negative(args: Any, names: Iterable[str]) -> None:
    """Each `--name` that is set must be >= 0 (NaN is refused)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:
            fail(f"--{name}", ">= 0", value)


def check_unit_interval(args: Any, names: Iterable[str]) -> None:
    """Each `--name` that is set must lie in [0, 1] (probabilities)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            fail(f"--{name}", "in [0, 1]", value)


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Base of a script's recipes: frozen dataclasses whose fields are flag values (a field with metadata
    `{"flag": False}` is not a flag, e.g. a recipe's name)."""

    def values(self) -> dict[str, Any]:
        """Flag name -> value of every flag the recipe sets."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("flag", True)
        }


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`--config_overrides "a=1,b=0.5,c=(2,2,6,2)"` -> {"a": 1, "b": 0.5, "c": (2, 2, 6, 2)} (values parsed as
    JSON, brackets as tuples); every key must be a `BEVTConfig` field (a typo names the field it probably means)."""
    if not text:
        return {}
    overrides: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(BEVTConfig)} | {"num_labels"}
    for item in _split_top_level(text):
        if "=" not in item:
            fail(
                "--config_overrides",
                'comma-separated key=value pairs, e.g. "embed_dim=96,drop_path_rate=0.2"',
                text,
            )
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r} for {key!r}?" if close else f"{key!r} is not one"
            fail("--config_overrides", f"key=value pairs of BEVTConfig fields ({hint})", text)
        try:
            value = json.loads(raw.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            value = raw
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return overrides


def _split_top_level(text: str) -> list[str]:
    """Split at the commas that are not inside brackets: "a=1,b=(2,2)" -> ["a=1", "b=(2,2)"]."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _show(value: Any, none: str = "none") -> str:
    if value is None:
        return none
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


class ArgumentGroup:
    """Base of the argument groups: every group's `__post_init__` checks its own fields, then calls the next group's
    (cooperative `super()`), so a script's arguments class runs the checks of all its groups."""

    def __post_init__(self) -> None:
        pass


class RecipeArguments(ArgumentGroup):
    """Base of a script's arguments class: the fields its recipes set stay `None` unless given, and are filled from
    the active recipe in the subclass's `__post_init__` (with `fill_from(recipe)`) before the groups' checks.

    Subclasses define `help_recipes()` (the recipes `--help` lists, by label, and the demo recipe), and may set
    `none_display` (how a recipe's None reads in `--help`, per flag) and `help_overrides` (flag -> help text that
    replaces the shared group's, for this script).
    """

    none_display: dict[str, str] = {}
    help_overrides: dict[str, str] = {}

    @classmethod
    def help_recipes(cls) -> tuple[dict[str | None, Recipe], Recipe | None]:
        """({label: recipe} of the recipes `--help` lists (label None: the only one), the demo recipe)."""
        return {}, None

    @classmethod
    def recipe_help(cls, name: str) -> str | None:
        """`(default: X; demo: Y)` / `(default: k400 X, ssv2 Y; demo: Z)` for a flag set by the recipes, else None.

        A recipe `based_on` another one is shown only where its value differs."""
        recipes, demo = cls.help_recipes()
        if not recipes or name not in next(iter(recipes.values())).values():
            return None
        none = cls.none_display.get(name, "none")
        shown: list[tuple[str | None, str]] = []
        for label, recipe in recipes.items():
            value = _show(recipe.values()[name], none)
            based_on = getattr(recipe, "based_on", None)
            parent = recipes.get(based_on) if based_on is not None else None
            if parent is not None and _show(parent.values()[name], none) == value:
                continue
            shown.append((label, value))
        values = {value for _, value in shown}
        main = shown[0][1] if len(values) == 1 else ", ".join(f"{label} {value}" for label, value in shown)
        demo_value = _show(demo.values()[name], none) if demo is not None else None
        if demo_value is None or (len(values) == 1 and demo_value == main):
            return f"(default: {main})"
        return f"(default: {main}; demo: {demo_value})"

    def fill_from(self, recipe: Recipe) -> set[str]:
        """Set every flag the recipe sets that is still None; returns the names that were given (not None)."""
        given = set()
        for name, value in recipe.values().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
            else:
                given.add(name)
        return given


# ---------------------------------------------------------------------------------------------------------------
# Shared groups
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelArguments(ArgumentGroup):
    _argument_group_name = "model"

    model_name_or_path: str | None = HfArg(default=None, help="Start from a saved BEVT folder.")
    model_preset: str | None = HfArg(
        default=None, help="Architecture when training from scratch.", metadata={"choices": sorted(PRESETS)}
    )
    drop_path_rate: float | None = HfArg(
        default=None,
        help="Stochastic depth (a --model_name_or_path model keeps its own unless given; a new model: the recipe's).",
    )
    config_overrides: str | None = HfArg(
        default=None,
        help='Config fields of a new model (from scratch), applied last, e.g. "embed_dim=64,depths=(2,2,6,2)".',
    )

    def __post_init__(self) -> None:
        if self.drop_path_rate is not None and not 0 <= self.drop_path_rate < 1:
            fail("--drop_path_rate", "in [0, 1)", self.drop_path_rate)
        if self.model_name_or_path and self.config_overrides:
            expected = "omitted with --model_name_or_path (it only applies to new models)"
            fail("--config_overrides", expected, self.config_overrides)
        parse_config_overrides(self.config_overrides)  # a typo fails here, before any data is read
        if self.model_name_or_path:
            check_model_folder("--model_name_or_path", self.model_name_or_path, "bevt", "a BEVT model folder")
        super().__post_init__()


@dataclasses.dataclass
class DataLoadingArguments(ArgumentGroup):
    _argument_group_name = "data loading"

    num_workers: int | None = HfArg(
        default=None,
        help="Data-loading worker processes per rank (per stream in pretraining; capped at the rank's shards).",
    )
    shuffle_buffer: int | None = HfArg(
        default=None, help="Samples in the training stream's shuffle buffer (0: no shuffling)."
    )
    max_bad_sample_fraction: float = HfArg(
        default=0.1,
        help="Stop the run (DataQualityError) when more than this fraction of the samples read fail to load "
        "(checked after the first 100); each bad sample is skipped, counted and logged.",
    )
    shard_cache_dir: str | None = HfArg(
        default=None,
        help="Shards given as URLs (hf://, https://, s3://...): keep a local copy of each shard read completely "
        "here, and read it from there in later epochs (default: stream from the URL every time).",
    )
    shard_max_retries: int = HfArg(
        default=5,
        help="Remote shards: tries after a dropped connection, a 5xx or a timeout (resumed at the byte) before "
        "the rest of the shard counts as skipped (shard_unavailable).",
    )
    shard_timeout: float = HfArg(default=60.0, help="Remote shards over HTTP(S): seconds without data before a retry.")
    storage_options: str | None = HfArg(
        default=None,
        help='Remote shards: fsspec storage options as JSON, e.g. \'{"anon": true}\' for a public S3 bucket '
        "(credentials otherwise come from the usual environment / config files; hf:// uses your Hub token).",
    )

    def __post_init__(self) -> None:
        check_non_negative(self, ("shuffle_buffer", "num_workers", "shard_max_retries"))
        check_unit_interval(self, ("max_bad_sample_fraction",))
        if not self.shard_timeout > 0:
            fail("--shard_timeout", "> 0 seconds", self.shard_timeout)
        if self.storage_options is not None:
            try:
                options = json.loads(self.storage_options)
            except ValueError:
                options = None
            if not isinstance(options, dict):
                fail("--storage_options", "a JSON object, e.g. '{\"anon\": true}'", self.storage_options)
        super().__post_init__()

    def stream_options(self) -> dict[str, Any]:
        """The `build_stream` keywords of every stream: the bad-sample threshold and, for shards given as URLs, the
        cache, retries, timeout and storage options."""
        return {
            "max_failure_fraction": self.max_bad_sample_fraction,
            "cache_dir": self.shard_cache_dir,
            "max_retries": self.shard_max_retries,
            "timeout": self.shard_timeout,
            "storage_options": json.loads(self.storage_options) if self.storage_options else None,
        }


@dataclasses.dataclass
class ComputeArguments(ArgumentGroup):
    _argument_group_name = "compute"

    gradient_checkpointing: bool = HfArg(default=False, help="Recompute activations in backward.")
    torch_compile: bool = HfArg(
        default=False,
        help="Compile the encoder (the bulk of the compute) with torch.compile (inductor, static shapes); the heads "
        "and losses, which select masked positions or labels, stay eager. The first steps pay the compilation.",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = HfArg(
        default=None, help="Overrides the Accelerate config (fp16 needs a GPU)."
    )
    torch_threads: int | None = HfArg(
        default=None, help="Intra-op CPU threads per process (torch.set_num_threads)."
    )

    def __post_init__(self) -> None:
        check_positive_ints(self, ("torch_threads",))
        super().__post_init__()


@dataclasses.dataclass
class OptimizerArguments(ArgumentGroup):
    _argument_group_name = "optimizer"

    learning_rate: float | None = HfArg(default=None, help="Peak learning rate.")
    weight_decay: float | None = HfArg(
        default=None,
        help="AdamW weight decay (none on norms, biases, relative position bias tables and the mask token).",
    )
    adam_beta1: float = HfArg(default=0.9, help="AdamW beta1.")
    adam_beta2: float = HfArg(default=0.999, help="AdamW beta2.")
    adam_epsilon: float = HfArg(default=1e-8, help="AdamW epsilon.")
    max_grad_norm: float | None = HfArg(default=None, help="Gradient clipping norm (0 disables).")

    def __post_init__(self) -> None:
        if self.learning_rate is not None and not self.learning_rate > 0:
            fail("--learning_rate", "> 0", self.learning_rate)
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            fail("--adam_beta1/--adam_beta2", "in [0, 1)", (self.adam_beta1, self.adam_beta2))
        check_non_negative(self, ("weight_decay", "max_grad_norm"))
        super().__post_init__()


@dataclasses.dataclass
class ScheduleArguments(ArgumentGroup):
    _argument_group_name = "schedule"

    lr_scheduler_type: str = HfArg(
        default="cosine",
        help="Learning-rate schedule after the linear warmup.",
        metadata={"choices": SCHEDULERS},
    )
    num_warmup_steps: int | None = HfArg(default=None, help="Warmup steps (overrides the warmup fraction).")
    max_train_steps: int | None = HfArg(default=None, help="Optimizer steps (overrides --num_train_epochs).")
    num_train_epochs: float | None = HfArg(
        default=None, help="Epochs (needs dataset_info.json next to the shards)."
    )
    gradient_accumulation_steps: int | None = HfArg(default=None, help="Micro-steps per optimizer step.")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("gradient_accumulation_steps",))
        if self.num_warmup_steps is not None and self.num_warmup_steps < 0:
            fail("--num_warmup_steps", ">= 0", self.num_warmup_steps)
        if self.max_train_steps is not None and self.max_train_steps < 1:
            fail("--max_train_steps", "a positive integer", self.max_train_steps)
        if self.max_train_steps is None and not (self.num_train_epochs or 0) > 0:
            fail("--max_train_steps or --num_train_epochs", "given (positive)", None)
        super().__post_init__()


@dataclasses.dataclass
class CheckpointArguments(ArgumentGroup):
    _argument_group_name = "checkpoints"

    output_dir: str | None = HfArg(default=None, help="Where checkpoints and the final model go.")
    checkpointing_steps: int | None = HfArg(
        default=None, help="Save a checkpoint every N optimizer steps (0: only at the end/on signals)."
    )
    save_total_limit: int | None = HfArg(
        default=None, help="Keep at most this many checkpoints (oldest deleted)."
    )
    resume_from_checkpoint: str | None = HfArg(
        default=None,
        help="A checkpoint folder, or 'latest': the newest complete one in --output_dir (none yet: start fresh, so "
        "a pre-emptible job can always pass 'latest').",
    )

    def __post_init__(self) -> None:
        check_non_negative(self, ("checkpointing_steps",))
        check_positive_ints(self, ("save_total_limit",))
        super().__post_init__()


@dataclasses.dataclass
class TrackingArguments(ArgumentGroup):
    _argument_group_name = "tracking"

    logging_steps: int | None = HfArg(default=None, help="Log every N optimizer steps.")
    with_tracking: bool = HfArg(default=False, help="Log metrics with the --report_to tracker.")
    report_to: str = HfArg(default="tensorboard", help="Accelerate tracker(s): tensorboard, wandb, all, ...")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("logging_steps",))
        from accelerate.utils import LoggerType

        trackers = [t.value for t in LoggerType]
        if self.report_to not in trackers:
            fail("--report_to", f"one of {', '.join(trackers)}", self.report_to)
        super().__post_init__()


@dataclasses.dataclass
class HubArguments(ArgumentGroup):
    _argument_group_name = "hub"

    push_to_hub: bool = HfArg(
        default=False, help="Upload the output folder to the Hub at the end of the run."
    )
    hub_model_id: str | None = HfArg(default=None, help="Hub repository (default: the output folder's name).")
    hub_token: str | None = HfArg(default=None, help="Hub token (default: the logged-in one).")

    def __post_init__(self) -> None:
        if self.push_to_hub:  # checked before training, not after hours of it
            from huggingface_hub import constants, get_token

            if constants.HF_HUB_OFFLINE:
                fail("--push_to_hub", "used online (HF_HUB_OFFLINE is set: the upload would fail after training)",
                     True)  # fmt: skip
            if not (self.hub_token or get_token()):
                fail("--push_to_hub", "given a Hub token: log in (`hf auth login`), set HF_TOKEN or pass --hub_token",
                     True)  # fmt: skip
        super().__post_init__()


@dataclasses.dataclass
class RunControlArguments(ArgumentGroup):
    _argument_group_name = "run control"

    seed: int = HfArg(default=42, help="Seed of the model init, data order, augmentations and masks.")
    max_nonfinite_steps: int = HfArg(
        default=5,
        help="Stop after this many consecutive steps with a NaN/inf loss or gradient (each is skipped).",
    )
    config: str | None = HfArg(
        default=None,
        help="A .yaml/.yml or .json file of flag values ({flag_name: value}); flags on the command line override "
        "it. The run saves its resolved arguments as <output_dir>/training_args.json, which works here too.",
    )

    def __post_init__(self) -> None:
        check_non_negative(self, ("seed",))
        check_positive_ints(self, ("max_nonfinite_steps",))
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to every flag's help unless the help already states its defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default:" in help_text:
            return help_text
        return super()._get_help_string(action)


def _field_groups(dtype: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """Init fields of `dtype` grouped by the `_argument_group_name` of the class that declares them, in MRO order
    (equal titles merge)."""
    init_fields = {f.name: f for f in dataclasses.fields(dtype) if f.init}
    groups: dict[str, list[dataclasses.Field]] = {}
    placed: set[str] = set()
    for cls in dtype.__mro__:
        title = cls.__dict__.get("_argument_group_name")
        if title is None:
            continue
        for name in cls.__dict__.get("__annotations__", {}):
            if name in init_fields and name not in placed:
                groups.setdefault(title, []).append(init_fields[name])
                placed.add(name)
    missing = sorted(set(init_fields) - placed)
    if missing:
        raise TypeError(
            f"{dtype.__name__}: fields {missing} belong to no argument group (_argument_group_name)"
        )
    return list(groups.items())


def _strip_optional(annotation: Any) -> Any:
    """`X | None` -> `X`."""
    if get_origin(annotation) in (types.UnionType, Union):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


class _StoreTuple(argparse.Action):
    """Store the values of a multi-value flag as a tuple (the dataclass field's type)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, tuple(values))


def _spellings(name: str) -> list[str]:
    """`num_frames` -> `["num_frames", "num-frames"]` (one spelling for a name without underscores)."""
    return list(dict.fromkeys((name, name.replace("_", "-"))))


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


class BEVTArgumentParser(HfArgumentParser):
    """`HfArgumentParser` for one arguments dataclass, with `--config FILE`, help groups per declaring class, tuple
    fields (`tuple[int, int]` -> `nargs=2`) and the recipes' defaults in the help texts. `parse(argv)` returns the
    dataclass instance (its `__post_init__` fills the recipe and checks every value)."""

    def __init__(self, dataclass_type: type, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_type, **kwargs)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        hints = get_type_hints(dtype)
        overrides = getattr(dtype, "help_overrides", {})
        recipe_help = getattr(dtype, "recipe_help", lambda name: None)
        for title, group_fields in _field_groups(dtype):
            group = self.add_argument_group(title)
            for original in group_fields:
                field = copy.copy(original)
                field.type = hints[field.name]
                help_text = " ".join(
                    t
                    for t in (overrides.get(field.name, field.metadata.get("help")), recipe_help(field.name))
                    if t
                )
                names = FLAG_NAMES.get(field.name, ())
                aliases = [
                    a for a in _as_list(original.metadata.get("aliases")) if a.lstrip("-") not in names
                ]
                aliases += [f"--{name}" for name in names if name != field.name]  # (dashes: see `parse`)
                field.metadata = types.MappingProxyType(
                    {**original.metadata, "help": help_text, "aliases": aliases}
                )
                if get_origin(_strip_optional(field.type)) is tuple:
                    action = self._add_tuple_argument(group, field)
                else:
                    HfArgumentParser._parse_dataclass_field(group, field)
                    action = group._group_actions[-1]
                if names and names[0] != field.name:  # the preferred name leads in --help
                    first = f"--{names[0]}"
                    action.option_strings = [first] + [o for o in action.option_strings if o != first]

    @staticmethod
    def _add_tuple_argument(group: Any, field: dataclasses.Field) -> argparse.Action:
        """A `tuple[T, T]` (or `tuple[T, ...]`) field: one flag taking 2 (or 1+) values of type T."""
        element_types = get_args(_strip_optional(field.type))
        kwargs = {k: v for k, v in field.metadata.items() if k not in ("aliases",)}
        kwargs["type"] = element_types[0]
        kwargs.setdefault("nargs", "+" if element_types[-1] is Ellipsis else len(element_types))
        kwargs["action"] = _StoreTuple
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        aliases = _as_list(field.metadata.get("aliases"))
        return group.add_argument(*(f"--{n}" for n in _spellings(field.name)), *aliases, **kwargs)

    def error(self, message: str) -> NoReturn:
        """A malformed command line (unknown flag, invalid choice, missing value): one `error:` line and exit status 2,
        like a `UsageError`, instead of argparse's full usage text."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """Parse `--config FILE` (if given) then `argv` (flags there win) into the arguments dataclass."""
        argv = list(sys.argv[1:] if argv is None else argv)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", default=None)
        config = pre.parse_known_args(argv)[0].config
        tokens = self.config_tokens(config) if config else []
        argv = [self._known_spelling(token) for token in argv]
        (args,) = self.parse_args_into_dataclasses(args=tokens + argv, look_for_args_file=False)
        return args

    def _known_spelling(self, token: str) -> str:
        """`--warmup-steps[=N]` -> `--warmup_steps[=N]` when only the underscore spelling is registered (aliases
        are registered with underscores only, to keep `--help` short; flag names have both spellings)."""
        name, sep, value = token.partition("=")
        if name.startswith("--") and name not in self._option_string_actions:
            underscored = "--" + name[2:].replace("-", "_")
            if underscored in self._option_string_actions:
                return underscored + sep + value
        return token

    def config_tokens(self, path: str) -> list[str]:
        """The flags of a `--config` file as command-line tokens (so they are converted and checked exactly like
        typed flags). Unknown keys are errors; null values, the `config` key and masked tokens are skipped."""
        file = Path(path)
        suffix = file.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            fail("--config", "a .yaml, .yml or .json file", path)
        if not file.is_file():
            fail("--config", "an existing file", path)
        import yaml

        try:
            text = file.read_text(encoding="utf-8")
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--config {path}: cannot read it: {err}") from None
        except (ValueError, yaml.YAMLError) as err:
            kind = "JSON" if suffix == ".json" else "YAML"
            raise UsageError(f"--config {path}: not valid {kind}: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise UsageError(
                f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}"
            )
        actions = {a.dest: a for a in self._actions if a.option_strings and a.dest != "help"}
        spelled = {
            o.lstrip("-").replace("-", "_"): a.dest for a in actions.values() for o in a.option_strings
        }
        tokens: list[str] = []
        for key, value in data.items():
            name = str(key).lstrip("-").replace("-", "_")
            name = spelled.get(name, name)  # an alias (e.g. warmup_steps) is its flag's setting
            if name not in actions:
                close = difflib.get_close_matches(name, sorted(actions), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"--config {path}: unknown setting {key!r}{hint}")
            if value is None or name == "config" or (name.endswith("_token") and value == MASKED):
                continue
            flag = f"--{name}"
            if isinstance(value, bool):
                tokens += [flag, "true" if value else "false"]
            elif isinstance(value, list | tuple):
                if actions[name].nargs in (None, "?"):
                    raise UsageError(f"--config {path}: {key!r} takes one value, got {value!r}")
                tokens += [flag, *(str(v) for v in value)]
            elif isinstance(value, dict):
                raise UsageError(f"--config {path}: {key!r} must be a value or a list, got {value!r}")
            else:
                tokens += [flag, str(value)]
        return tokens


# ---------------------------------------------------------------------------------------------------------------
# Saving and tracking
# ---------------------------------------------------------------------------------------------------------------


def _is_secret(name: str) -> bool:
    return name == "token" or name.endswith("_token")


def arguments_dict(args: Any) -> dict[str, Any]:
    """Every flag of `args` (a parsed arguments dataclass) as JSON-ready values, each `*_token` masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        value = getattr(args, f.name)
        if _is_secret(f.name) and value is not None:
            value = MASKED
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# Resuming: the arguments that may differ from the checkpoint's (how long, how often to log / save / evaluate, where
# the data and outputs are, workers, tracking, the Hub) and those that may not (a resumed run with another batch
# size, learning rate, schedule, seed or starting model is not the run that was saved). Any other change is allowed
# with a warning that names it.
RESUME_MAY_CHANGE = frozenset({
    "max_train_steps", "num_train_epochs", "logging_steps", "checkpointing_steps", "save_total_limit",
    "resume_from_checkpoint", "output_dir", "config", "with_tracking", "report_to", "push_to_hub", "hub_model_id",
    "hub_token", "num_workers", "torch_threads", "eval_steps", "eval_every_epochs", "per_device_eval_batch_size",
    "max_eval_views_per_forward", "shard_cache_dir", "shard_max_retries", "shard_timeout", "storage_options",
    "max_bad_sample_fraction", "max_nonfinite_steps", "dataset_name", "base_model", "log_sample_keys",
})  # fmt: skip
RESUME_MUST_MATCH = frozenset({
    "per_device_train_batch_size", "video_batch_size", "image_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
    "num_warmup_steps", "warmup_ratio", "warmup_epochs", "layer_decay", "backbone_lr_multiplier", "ema_decay", "seed",
    "stage", "model_name_or_path", "model_preset", "linear_probe", "freeze_backbone", "max_train_samples",
    "train_fraction",
})  # fmt: skip


def check_resumed_arguments(
    saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str
) -> list[str]:
    """Compare the arguments saved in a checkpoint (`arguments_dict` at save time) with the resumed run's.

    Raises `UsageError` naming every `RESUME_MUST_MATCH` flag that differs (with both values); returns one line per
    other changed flag outside `RESUME_MAY_CHANGE` (for a warning)."""

    def normal(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    changed = {
        name: (normal(saved[name]), normal(value))
        for name, value in current.items()
        if name in saved and name not in RESUME_MAY_CHANGE and normal(saved[name]) != normal(value)
    }
    refused = [f"--{n} {old!r} -> {new!r}" for n, (old, new) in changed.items() if n in RESUME_MUST_MATCH]
    if refused:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint}: the run was saved with other values of "
            + ", ".join(refused)
            + " (saved -> given). A resumed run must keep its batch sizes, learning rate, schedule, seed and model; "
            "pass the saved values (its training_args.json works as --config), or start a new run in another "
            "--output_dir"
        )
    return [f"--{n} {old!r} -> {new!r}" for n, (old, new) in changed.items()]


def save_training_args(args: Any, output_dir: str | Path) -> Path:
    """`<output_dir>/training_args.json`: the resolved arguments (recipe values filled in, tokens masked); pass it
    back with `--config` to run the same settings again."""
    path = Path(output_dir) / "training_args.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arguments_dict(args), indent=2) + "\n", encoding="utf-8")
    return path


def tracker_config(args: Any) -> dict[str, int | float | str | bool]:
    """The hyperparameters given to the trackers (TensorBoard hparams, W&B config): every flag, tokens masked,
    non-scalars as strings."""
    return {
        k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in arguments_dict(args).items()
    }
