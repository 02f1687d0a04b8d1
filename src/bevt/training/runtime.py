"""Setting a run up and finishing it: the Accelerator, logging, the output folder, demo data, the Hub upload, and
`run_script` (the scripts' entry point: exit status 2 with one `error:` line for a wrong flag)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration

from .arguments import UsageError, save_training_args

__all__ = [
    "HUB_IGNORE_PATTERNS",
    "build_accelerator",
    "check_cpu_bf16_speed",
    "compile_encoder",
    "cpu_allocator_hint",
    "needs_cpu_bf16_check",
    "push_to_hub",
    "run_script",
    "setup_logging",
    "start_run",
    "write_demo_data_once",
]

logger = get_logger(__name__)

Manifest = TypeVar("Manifest")  # what a demo-data writer returns

# Never uploaded by `push_to_hub`: checkpoints (and the temporary folders of their atomic saves/rotation) and the
# demo's synthetic shards. Each script adds its own (tracker logs, ...).
HUB_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*",
    "abandoned-checkpoint-*",
    ".tmp-*",
    ".old-*",
    ".deleting-*",
    "demo_data/*",
)


def run_script(main: Callable[[], int]) -> NoReturn:
    """`sys.exit(main())`, printing a `UsageError` as one `error:` line (exit status 2) instead of a traceback."""
    try:
        code = main()
    except UsageError as err:
        print(err.message, file=sys.stderr, flush=True)
        code = 2
    sys.exit(code)


def build_accelerator(args: Any) -> Accelerator:
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
    check_launch(accelerator)
    set_deepspeed_micro_batch(accelerator, args)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Stop a launch whose processes did not form one group, and say when a requested FSDP / DeepSpeed is not used.

    - `accelerate launch --num_processes 2` on a CPU-only host without `ACCELERATE_USE_CPU=1`: Accelerate 1.16 starts
      two processes that each train alone (`Num processes: 1`) and write the same `--output_dir`. Refused.
    - An FSDP config with `ACCELERATE_USE_CPU=1`: Accelerate enables FSDP only for GPU-like devices and runs plain DDP
      on CPU (the weights are replicated, not sharded). A warning.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and accelerator.num_processes == 1:
        hint = (
            " On CPU, launch with ACCELERATE_USE_CPU=1 (see the README's multi-process commands); FSDP and DeepSpeed "
            "configs need GPUs with this Accelerate."
            if accelerator.device.type == "cpu"
            else ""
        )
        raise UsageError(
            f"this process was launched as one of WORLD_SIZE={world} processes, but Accelerate formed no process group "
            f"(distributed type {accelerator.distributed_type.value}, 1 process): every process would train alone and "
            f"write the same --output_dir.{hint}"
        )
    for env, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type.value != wanted:
            logger.warning(
                f"the Accelerate config asks for {wanted}, but Accelerate runs {accelerator.distributed_type.value} "
                f"on {accelerator.device.type} (FSDP and DeepSpeed are enabled only on GPU-like devices by this "
                "Accelerate): the weights are not sharded."
            )


def set_deepspeed_micro_batch(accelerator: Accelerator, args: Any) -> None:
    """DeepSpeed wants `train_micro_batch_size_per_gpu`; Accelerate reads it from a prepared DataLoader, but the scripts
    read their own streams, so an `auto` value (the default of Accelerate's DeepSpeed configs) is set here from the
    per-device batch (pretraining: videos per device, or images in the image stage). DeepSpeed uses it for its
    bookkeeping only (`train_batch_size` = micro batch x accumulation x processes); the batches stay the scripts'."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not plugin.is_auto("train_micro_batch_size_per_gpu"):
        return
    micro = getattr(args, "per_device_train_batch_size", None)
    if micro is None:
        stage = getattr(args, "stage", "joint")
        micro = getattr(args, "image_batch_size" if stage == "image" else "video_batch_size", None)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = int(micro or 1)


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


# Below this bf16 / float32 speed of a matrix product, a bf16 training step on CPU is no faster than a float32 one:
# the rest of the step (casts, the float32 softmax, elementwise ops) costs more in bf16. Measured on an Intel Xeon
# (BENCHMARKS.md, "bf16 without AMX"): with AMX, products ~5x float32, the bf16 step was 2.1x faster than float32;
# with oneDNN kept to AVX-512-BF16 on the same CPU (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, the bf16 units of CPUs
# without AMX), products 0.59x float32, the bf16 step was 0.93x (slower) and bf16 inference 0.92x.
BF16_MIN_MATMUL_SPEEDUP = 1.0


def check_cpu_bf16_speed() -> float | None:
    """`--mixed_precision bf16` on CPU: how much faster this CPU multiplies in bf16 than in float32
    (`kernels_bevt.bf16_matmul_speedup`, measured once per machine and cached), with a warning where bf16 products
    are slower (below `BF16_MIN_MATMUL_SPEEDUP`). A measurement, not a guess from the CPU's name or flags; the run
    goes on in bf16."""
    from ..kernels_bevt import bf16_matmul_speedup

    speedup = bf16_matmul_speedup()
    if speedup is None:
        logger.warning("--mixed_precision bf16 on CPU: a bf16 matrix product failed on this CPU's kernels.")
    elif speedup < BF16_MIN_MATMUL_SPEEDUP:
        logger.warning(
            f"--mixed_precision bf16 on CPU: this CPU multiplies bf16 matrices at only {speedup:.2f}x the float32 "
            f"speed (measured at {torch.get_num_threads()} threads): expect a bf16 training step no faster than "
            "--mixed_precision no (measured 0.93x where products ran at 0.59x; on a CPU with AMX, products ~5x, "
            "the bf16 step was 2.1x faster; see BENCHMARKS.md)."
        )
    else:
        logger.info(f"bf16 matrix products on this CPU: {speedup:.2f}x the float32 speed (measured, cached).")
    return speedup


# Where Debian / Ubuntu (package libtcmalloc-minimal4) and Fedora / RHEL (gperftools-libs) install tcmalloc.
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc.so.4",
)


def cpu_allocator_hint() -> str | None:
    """For a CPU run under glibc's malloc: how to preload tcmalloc (the path where one is installed, else the
    package to install), which took the page faults out of a CPU training step (bf16 step 1.12-1.16x, float32
    1.06-1.11x faster on an Intel Xeon, BENCHMARKS.md "Memory allocator"). None when another allocator is in use."""
    from ..kernels_bevt import memory_allocator

    allocator = memory_allocator()
    if allocator != "glibc malloc":
        return None
    found = next((path for path in TCMALLOC_PATHS if os.path.exists(path)), None)
    how = (
        f"put LD_PRELOAD={found} in front of the launch command"
        if found
        else "install the package libtcmalloc-minimal4 (Debian / Ubuntu) or gperftools-libs (Fedora / RHEL), then "
        "put LD_PRELOAD=<its libtcmalloc_minimal.so.4> in front of the launch command"
    )
    return (
        f"CPU run with {allocator}: preloading tcmalloc made a CPU training step faster (page faults gone: bf16 "
        f"1.12-1.16x, float32 1.06-1.11x on an Intel Xeon, with a lower peak memory; README \"Performance\"): {how}."
    )


def needs_cpu_bf16_check(accelerator: Accelerator) -> bool:
    """bf16 on CPU, and this is the machine's local main process: one bf16 speed probe per machine (the other
    processes of that machine share its CPU and would time their products against each other's), none on GPU."""
    return (
        accelerator.mixed_precision == "bf16"
        and accelerator.device.type == "cpu"
        and accelerator.is_local_main_process
    )


def prepare_cpu_kernels(accelerator: Accelerator) -> None:
    """CPU runs: each machine's local main process builds the native attention kernels and runs the kernel
    calibrations (`kernels_bevt.linear_kernels`, `native_attention` for the run's dtypes; all cached per machine)
    before the other processes read the cache, so every rank of a machine uses the same kernels. Ranks calibrating
    at once would time contended products and could choose differently (results then differ in rounding between
    ranks and between a run and its resumption)."""
    from ..kernels_bevt import linear_kernels, native_attention

    if accelerator.is_local_main_process:
        linear_kernels()
        native_attention(torch.float32)
        if accelerator.mixed_precision == "bf16":
            native_attention(torch.bfloat16)
    accelerator.wait_for_everyone()


def start_run(args: Any, *, quiet_accelerate: bool) -> Accelerator:
    """`--torch_threads`, `build_accelerator` + `setup_logging`, log the distributed setup, create `--output_dir`
    and write `training_args.json` there (main process)."""
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    accelerator = build_accelerator(args)
    setup_logging(accelerator, quiet_accelerate=quiet_accelerate)
    logger.info(accelerator.state, main_process_only=False)
    if needs_cpu_bf16_check(accelerator):
        check_cpu_bf16_speed()
    if accelerator.device.type == "cpu":
        from ..kernels_bevt import keep_freed_memory

        if keep_freed_memory():
            logger.info(
                "CPU run: glibc's malloc keeps large freed blocks for reuse (no page faults for each step's "
                "temporaries: a training step 1.04x fp32 / 1.12x bf16 faster on an Intel Xeon; BEVT_MALLOC_TUNING=0 "
                "keeps glibc's defaults)."
            )
        elif hint := cpu_allocator_hint():
            logger.info(hint)
        prepare_cpu_kernels(accelerator)
    if accelerator.is_main_process:
        save_training_args(args, args.output_dir)
    return accelerator


def write_demo_data_once(
    accelerator: Accelerator, folder: str | Path, write: Callable[[Path], Manifest], what: str = "demo data"
) -> Manifest:
    """Run the writer `write(folder)` (demo data, a training subset, ...) on the main process, then on every rank
    (where it only reads what the main process wrote, as writers reuse a complete folder); returns its result."""
    folder = Path(folder)
    if accelerator.is_main_process:
        started = time.perf_counter()
        write(folder)
        logger.info(f"{what} ready in {folder} ({time.perf_counter() - started:.1f}s)")
    accelerator.wait_for_everyone()
    return write(folder)


def compile_encoder(model: torch.nn.Module) -> None:
    """`--torch_compile`: compile the BEVT encoder in place (`nn.Module.compile`, inductor, `dynamic=False`).

    The encoder (Swin stages) holds nearly all the compute and sees fixed shapes per stream (one graph for videos,
    one for images, one more per other batch size). Compiling the whole model instead traces the heads' selection of
    masked positions (data-dependent sizes), which forces dynamic shapes and failed in inductor on CPU. State-dict keys
    do not change (no `_orig_mod.` prefix). Call it on the unwrapped model, after the EMA copy is made and after
    `accelerator.prepare`."""
    if next(model.parameters()).device.type == "cpu":
        logger.warning(
            "--torch_compile on CPU: the compiled encoder is slower than the eager one (a Swin-T training step "
            "measured 1.3x slower in fp32 on an AMD Zen 5 and 1.2x slower in bf16 on an Intel Xeon, see "
            "BENCHMARKS.md): under compile the model's fused attention and linear paths step aside."
        )
    model.bevt.encoder.compile(dynamic=False)


def push_to_hub(args: Any, *, commit_message: str, ignore_patterns: Iterable[str]) -> None:
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
