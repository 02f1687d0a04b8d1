#!/usr/bin/env python
"""What BEVT pretraining buys at small scale: pretrain on unlabeled clips (+ images), fine-tune / linear-probe with
few labels, against scratch at equal fine-tuning steps, on a held-out synthetic temporal task. CPU, one command.

    python benchmarks/transfer.py                          # the default budget (~45 min on 2 cores, ~12 on 8)
    python benchmarks/transfer.py --split dev              # the same runs scored on the dev split (for tuning)
    python benchmarks/transfer.py --smoke                  # a tiny end-to-end run (CI)

The task (`make_task_clip`, `--task shapes`): 72 px, 16-frame clips of one shape (disc, square or triangle) filled
with the pretraining demo's textures (stripes, checkerboard, flat) in brighter colours, over a smooth darker colour
gradient; the class is what the shape does over time (6 classes: moving right / left / down / up, growing,
shrinking). No single frame tells the class; a horizontal flip swaps two classes (fine-tuning does not flip).
`--task shape-motion`: the same clips, but the class is the shape and its horizontal direction (3 shapes x right /
left: appearance and motion both needed, the setting where the image stream has something to teach).
`--task shape-motion-plain`: shape-motion on a plain background of one random colour (the shape is the only
structure; on the gradients most of what a pixel / token target asks to predict is background).
`--task shape-motion-flat`: shape-motion with a flat-colour shape on a plain background (no texture, no gradient:
a coloured silhouette on one colour; what varies besides the class is colours, size, position and speed).
`--task demo` uses the fine-tuning demo's clips (`bevt.data.demo_finetuning.make_demo_clip`: scratch reaches
98% with 32 labels, no room to show a gain); `--task flat-shapes` flat shapes of any colour on any gradient
(scratch at chance with 32 labels).

Data, written once under `<output_dir>/data` (fixed data seed, independent of the run seeds):
- `unlabeled/videos`, `unlabeled/images`: clips and single frames of the same generator, labels discarded
  (the pretraining data: in-domain, unlabeled, as when pretraining on K400 before fine-tuning on few K400 labels);
- `train`: a labeled pool; every run fine-tunes on a class-balanced subset of `--labels` clips chosen by its seed
  (`run_finetuning.py --max_train_samples`);
- `dev`: labeled clips for choosing hyperparameters (`--split dev`); `eval`: the held-out clips the table reports.

Runs (each a subprocess of the real scripts, as a user would type them, `OMP_NUM_THREADS=1`, `--jobs` at a time):
1. per seed, `run_tokenizer_training.py` on the unlabeled frames (its demo recipe: VQGAN, 32 px -> 4x4 ids,
   64 codes, width 16);
2. per seed and pretraining variant, `run_pretraining.py` (preset `test`, 64 px, 8 frames, window 4x2x2): joint
   image + video with each target (trained tokenizer, HOG, pixels, the random tokenizer as control), the targets of
   `--frozen_embedding_targets` again with `--freeze_video_patch_embedding`, and the paper's ablation for
   `--ablation_target`: video-only (`--image_loss_weight 0`) and image-only (`--video_loss_weight 0`) at the same
   steps and batches;
3. per seed and start (scratch or a pretraining folder), `run_finetuning.py` full fine-tuning and `--linear_probe`
   with `--max_train_samples --labels`, the same steps, `--final_model last` (no checkpoint picked on the scored
   split), evaluated once at the end.

Every hyperparameter is fixed before looking at the eval split (the module constants below; `--split dev` is for
choosing them). The table reports mean +- std over the seeds (never the best seed), written to
`<output_dir>/transfer_<split>.md` and `.json`; a finished run is reused when its command, the data and the runs it
builds on are unchanged (rerun after a change and only the changed runs and those downstream of them run again),
also where the whole output folder was copied or moved (paths under it do not count in the comparison).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # this checkout's package first (the worker processes inherit sys.path)
    sys.path.insert(0, str(ROOT / "src"))

from bevt.data.demo_finetuning import MotionRanges, encode_mp4, trajectory  # noqa: E402 (after the path)

MOTION_CLASS_NAMES: tuple[str, ...] = (
    "moving right",
    "moving left",
    "moving down",
    "moving up",
    "growing",
    "shrinking",
)
SHAPES = ("disc", "square", "triangle")
SHAPE_MOTION_CLASS_NAMES: tuple[str, ...] = tuple(
    f"{shape} moving {way}" for shape in SHAPES for way in ("right", "left")
)  # label = 2 * shape index + direction, as make_task_clip draws them
TEXTURES = ("stripes", "checker", "flat")


@dataclass(frozen=True)
class TaskSpec:
    """What a `--task` draws (`make_task_clip`): `classes` "motion" (the class is what a random shape does) or
    "shape-motion" (the shape AND its horizontal direction, 3 shapes x right / left: appearance counts as much as
    motion, where motion classes leave the image stream nothing to teach); a `plain` one-colour background instead of
    a colour gradient; the shape's `textures`. "demo" is the fine-tuning demo's generator (the rest unused)."""

    classes: str
    plain: bool = False
    textures: tuple[str, ...] = TEXTURES

    @property
    def class_names(self) -> tuple[str, ...]:
        return SHAPE_MOTION_CLASS_NAMES if self.classes == "shape-motion" else MOTION_CLASS_NAMES


TASK_SPECS = {
    "shapes": TaskSpec("motion"),
    "flat-shapes": TaskSpec("motion", textures=("flat",)),
    "demo": TaskSpec("demo"),
    "shape-motion": TaskSpec("shape-motion"),
    "shape-motion-plain": TaskSpec("shape-motion", plain=True),
    "shape-motion-flat": TaskSpec("shape-motion", plain=True, textures=("flat",)),
}
TASKS = tuple(TASK_SPECS)
TASK = "shapes"  # set by --task


def class_names() -> tuple[str, ...]:
    """The class names of the current `--task` (`TASK`)."""
    return TASK_SPECS[TASK].class_names


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters, fixed a priori (demo recipes of the two scripts, at 64 px / 8 frames)
# ---------------------------------------------------------------------------------------------------------------

IMAGE_SIZE, NUM_FRAMES, CLIP_SIZE, CLIP_FRAMES = 64, 8, 72, 16
PRETRAIN_FLAGS = [
    "--model_preset", "test", "--image_size", str(IMAGE_SIZE), "--num_frames", str(NUM_FRAMES),
    "--frame_interval", "2", "--scale_range", "64", "80", "--min_mask_patches", "2", "--mask_ratio", "0.5",
    "--tube_range", "0.5", "1.0", "--video_batch_size", "4", "--image_batch_size", "16", "--shuffle_buffer", "64",
    "--num_workers", "0", "--drop_path_rate", "0.0", "--learning_rate", "2e-3", "--weight_decay", "0.05",
    "--max_grad_norm", "3.0", "--warmup_ratio", "0.1", "--torch_threads", "1",
]  # fmt: skip
FINETUNE_FLAGS = [
    "--model_preset", "test", "--num_frames", str(NUM_FRAMES), "--sampling", "uniform", "--image_size",
    str(IMAGE_SIZE), "--short_side", str(CLIP_SIZE), "--crop_scale", "0.6", "1.0", "--drop_path_rate", "0.0",
    "--classifier_dropout", "0.0", "--flip_prob", "0.0", "--randaug", "none", "--random_erasing", "0.0",
    "--ema_decay", "0.0", "--weight_decay", "0.05", "--layer_decay", "1.0",
    "--backbone_lr_multiplier", "1.0", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
    "--max_grad_norm", "5.0", "--eval_num_clips", "2", "--eval_num_crops", "1", "--per_device_eval_batch_size", "16",
    "--num_workers", "0", "--shuffle_buffer", "256", "--torch_threads", "1", "--final_model", "last",
    "--dataset_name", "bevt-transfer-synthetic",
]  # fmt: skip
FINETUNE_LR, FINETUNE_LABEL_SMOOTHING = "1e-3", "0.1"
PROBE_LR = "1e-2"  # BatchNorm + linear on frozen features: a larger step than full fine-tuning
# run_tokenizer_training.py's demo recipe (the pretraining demo's tokenizer geometry: 32 px -> 4x4 ids of a 64 px input)
TOKENIZER_FLAGS = [
    "--image_size", str(IMAGE_SIZE // 2), "--crop_scale", "0.64", "1.0", "--image_batch_size", "32",
    "--shuffle_buffer", "64", "--num_workers", "0", "--tokenizer_type", "vqgan", "--vocab_size", "64", "--width", "16",
    "--ema_decay", "0.9", "--dead_code_restart_steps", "10", "--learning_rate", "2e-3", "--weight_decay", "0.0",
    "--max_grad_norm", "1.0", "--warmup_ratio", "0.0", "--torch_threads", "1",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The synthetic task
# ---------------------------------------------------------------------------------------------------------------


# The task's motion: larger, longer-travelling shapes than the fine-tuning demo's; classes 1 (left) and 3 (up) run
# backwards along their axis (MOTION_CLASS_NAMES).
TASK_MOTION = MotionRanges(
    radius=(0.12, 0.18), travel=(0.4, 0.6), small=(0.08, 0.12), growth=(2.0, 2.6), reversed_labels=(1, 3)
)
# 3 Mb/s keeps every frame of these textured 72 px clips at ~29 dB (the bit rate every benchmark clip was made with).
TASK_BIT_RATE = 3_000_000


def _gradient_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float background: a smooth gradient between two darker colours (channels in [0, 150]) in a
    random direction."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    first, second = rng.uniform(0, 150, size=3), rng.uniform(0, 150, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    mix = np.clip(0.5 + (ys - 0.5) * np.sin(angle) + (xs - 0.5) * np.cos(angle), 0, 1)[..., None]
    return first * (1 - mix) + second * mix


def _plain_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float background of one darker colour (channels in [0, 150]): `--task shape-motion-plain`,
    where the moving shape is the only structure of a clip (on the gradient backgrounds most of the pixel variance,
    hence most of what a pixel or token target asks to predict, is the background)."""
    return np.broadcast_to(rng.uniform(0, 150, size=3), (size, size, 3)).astype(np.float64)


def _bright_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float texture of two brighter colours (channels in [90, 255]), stripes, a checkerboard or
    flat. The contrast sets the difficulty: objects always brighter than the background (channels in [130, 255] on
    [0, 90]) gave scratch 99.5% with 64 labels, any colour on any background chance level, these ranges 57%
    (dev split, one seed)."""
    from bevt.data.demo_pretraining import _texture

    texture = _texture(kind, size, rng)  # colours in [0, 255]: mapped into [90, 255]
    return 90.0 + texture * (165.0 / 255.0)


def make_task_clip(
    label: int, rng: np.random.Generator, size: int = CLIP_SIZE, num_frames: int = CLIP_FRAMES
) -> np.ndarray:
    """One clip of class `label`: uint8 `(num_frames, size, size, 3)`.

    A textured shape (disc, square or triangle; stripes, checkerboard or flat colour: the pretraining demo's
    textures, in brighter colours) does the class's motion over a smooth darker colour gradient. No pixel noise: HOG and normalised-pixel
    targets of a flat noisy patch are normalised noise (unpredictable), which would handicap those targets.
    """
    from bevt.data.demo_pretraining import _shape_alpha

    spec = TASK_SPECS[TASK]
    if spec.classes == "demo":
        from bevt.data.demo_finetuning import make_demo_clip

        return make_demo_clip(label, rng, size=size, num_frames=num_frames)
    background = _plain_background(size, rng) if spec.plain else _gradient_background(size, rng)
    if spec.classes == "shape-motion":  # label = 2 * shape + direction (0: right, 1: left)
        shape, motion = SHAPES[label // 2], label % 2
    else:
        shape, motion = SHAPES[int(rng.integers(len(SHAPES)))], label
    texture = _bright_texture(spec.textures[int(rng.integers(len(spec.textures)))], size, rng)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i, (cy, cx, radius) in enumerate(trajectory(motion, size, num_frames, rng, TASK_MOTION)):
        alpha = _shape_alpha(shape, size, cy, cx, radius)[..., None]
        frame = background * (1 - alpha) + texture * alpha
        frames[i] = np.clip(frame, 0, 255).round().astype(np.uint8)
    return frames


def _labeled_samples(
    count: int, seed: int, split: str, with_labels: bool = True
) -> Iterator[tuple[str, str, bytes, dict]]:
    """`(key, "mp4", bytes, meta)` for `write_shards`: classes balanced and interleaved (labels None when unlabeled)."""
    rng = np.random.default_rng([seed, sum(split.encode())])
    names = class_names()
    for index in range(count):
        label = index % len(names) if with_labels else int(rng.integers(len(names)))
        key = f"{split}_{index:06d}"
        meta = {"label": label, "label_name": names[label]} if with_labels else {"label": None}
        yield key, "mp4", encode_mp4(make_task_clip(label, rng), bit_rate=TASK_BIT_RATE), {**meta, "path": f"synthetic/{key}.mp4"}


def _image_samples(count: int, seed: int, per_clip: int = 4) -> Iterator[tuple[str, str, bytes, dict]]:
    """Single frames as JPEG: `per_clip` random frames of each clip of the generator (random classes)."""
    from bevt.data.demo_pretraining import encode_jpeg

    rng = np.random.default_rng([seed, 7])
    clip = None
    for index in range(count):
        if index % per_clip == 0:
            clip = make_task_clip(int(rng.integers(len(class_names()))), rng)
        key = f"image_{index:06d}"
        yield (
            key,
            "jpg",
            encode_jpeg(clip[int(rng.integers(len(clip)))]),
            {"label": None, "path": f"synthetic/{key}.jpg"},
        )


@dataclass(frozen=True)
class DataSizes:
    """Clips per split (images: single frames, 4 per generated clip)."""

    unlabeled_videos: int = 384
    unlabeled_images: int = 1024
    train: int = 128
    dev: int = 240
    eval: int = 300


def write_task_data(
    root: Path, sizes: DataSizes, splits: tuple[str, ...], seed: int = 1234, jobs: int = 1
) -> dict[str, str]:
    """Write the shards of `splits` (of videos, images, train, dev, eval) under `root`, each reused when written
    with the same settings; returns split -> folder. The data seed is fixed: every run seed sees the same clips."""
    from bevt.data.shards import write_shards

    def write(split: str) -> str:
        folder = root / split
        settings = {"size": getattr(sizes, {"videos": "unlabeled_videos", "images": "unlabeled_images"}.get(split, split)),
                    "seed": seed, "classes": list(class_names()), "clip": [CLIP_SIZE, CLIP_FRAMES], "version": 7, "task": TASK}  # fmt: skip
        manifest = root / f"{split}.json"
        if manifest.is_file() and json.loads(manifest.read_text()) == settings and folder.is_dir():
            return str(folder)
        shutil.rmtree(folder, ignore_errors=True)
        count = settings["size"]
        if split == "videos":
            samples = list(_labeled_samples(count, seed, "unlabeled", with_labels=False))
            write_shards(samples, folder, prefix="videos", num_shards=min(2, count), kind="video")
        elif split == "images":
            write_shards(list(_image_samples(count, seed)), folder, prefix="images", num_shards=min(2, count))
        else:
            samples = list(_labeled_samples(count, seed, split))
            write_shards(samples, folder, prefix=split, num_shards=1, labels=class_names())
        manifest.write_text(json.dumps(settings))
        return str(folder)

    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(
        max(1, jobs)
    ) as pool:  # numpy and the encoder release the GIL for most of the work
        return dict(zip(splits, pool.map(write, splits), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def _relative_to(arg: str, root: Path) -> str:
    """`arg` with a leading `root` written as `<output_dir>` (`root` itself, or a path inside it)."""
    prefix = str(root)
    if arg == prefix or arg.startswith(prefix + os.sep):
        return "<output_dir>" + arg[len(prefix) :]
    return arg


@dataclass
class Run:
    """One command: `argv` of `script` (run_tokenizer_training.py, run_pretraining.py or run_finetuning.py)."""

    name: str
    script: str
    argv: list[str]
    output_dir: Path
    needs: list[str] = field(default_factory=list)
    status: str = "pending"  # pending, done, reused, failed, skipped
    seconds: float = 0.0

    data_version: str = ""  # the data manifests + the keys of the runs it needs: such changes are not reused
    root: Path | None = None  # the benchmark's --output_dir: a moved or copied one keeps its runs' keys

    @property
    def key(self) -> str:
        """What the run's reuse depends on: script, argv (with paths under `root` written relative to it, so that an
        output folder copied or moved elsewhere is reused there) and `data_version`."""
        argv = self.argv if self.root is None else [_relative_to(arg, self.root) for arg in self.argv]
        return hashlib.sha256(json.dumps([self.script, argv, self.data_version]).encode()).hexdigest()[:16]

    @property
    def marker(self) -> Path:
        return self.output_dir / "transfer_run.json"

    def finished_before(self) -> bool:
        if not self.marker.is_file():
            return False
        return json.loads(self.marker.read_text()).get("key") == self.key

    def record(self) -> dict:
        """What the finished run's marker says of it: `seconds`, `finished` (UTC, "%Y-%m-%d %H:%M"; the marker's
        modification time for markers written before it was recorded) and `machine` (None where not recorded)."""
        record = json.loads(self.marker.read_text())
        finished = record.get("finished") or time.strftime(
            "%Y-%m-%d %H:%M", time.gmtime(self.marker.stat().st_mtime)
        )
        return {"seconds": float(record.get("seconds", 0.0)), "finished": finished, "machine": record.get("machine")}

    def mark_reused(self) -> None:
        """A run finished earlier with the same key: reused, with the run time its marker recorded."""
        self.status = "reused"
        self.seconds = self.record()["seconds"]

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / self.script), *self.argv]


def _load_script(filename: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(filename).stem, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run_here(script: str, argv: list[str], log: str) -> int:
    """Run `script`'s `main(argv)` in this process with file descriptors 1 and 2 sent to `log` (the logging
    handlers the scripts install keep writing to fd 2, so every run's log lands in its own file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    try:
        print(shlex.join([script, *argv]) + "\n", flush=True)
        return int(_load_script(script).main(argv) or 0)
    except SystemExit as exc:  # a UsageError (exit 2) or an explicit exit
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:  # noqa: BLE001 - recorded as a failed run, with its traceback in the log
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, handle):
            os.close(fd)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def execute(run: Run, log_dir: Path, pool: ProcessPoolExecutor | None) -> None:
    """Run one command: in a worker process of `pool` (its `main(argv)`), else as a fresh subprocess exactly as a
    user would type it; both with OMP_NUM_THREADS=1 and the output in `log_dir/<name>.log`."""
    if run.finished_before():
        run.mark_reused()
        return
    shutil.rmtree(run.output_dir, ignore_errors=True)
    log = log_dir / f"{run.name}.log"
    started = time.perf_counter()
    if pool is not None:
        code = pool.submit(_run_here, run.script, run.argv, str(log)).result()
    else:
        with open(log, "w") as handle:
            handle.write(shlex.join(run.command()) + "\n\n")
            handle.flush()
            code = subprocess.run(
                run.command(), cwd=ROOT, env=_child_env(), stdout=handle, stderr=subprocess.STDOUT
            ).returncode
    run.seconds = round(time.perf_counter() - started, 1)
    run.status = "done" if code == 0 else "failed"
    if code == 0:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"key": run.key, "seconds": run.seconds, "argv": run.argv, "machine": machine(),
                  "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip
        run.marker.write_text(json.dumps(record) + "\n")
    else:
        print(f"  FAILED ({code}): {run.name}, see {log}", flush=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_all(runs: list[Run], log_dir: Path, jobs: int, pool: ProcessPoolExecutor | None) -> None:
    """Run every run, `jobs` at a time: a free slot takes the first run in list order whose needs have finished
    (so a seed's fine-tunings go before the next seed's pretrainings); a run whose needs failed is skipped."""
    import threading

    pending = list(runs)
    by_name = {run.name: run for run in runs}
    lock = threading.Condition()

    def take() -> Run | None:
        with lock:
            while pending:
                for run in pending:
                    states = [by_name[n].status for n in run.needs]
                    if all(state in ("done", "reused", "failed", "skipped") for state in states):
                        pending.remove(run)
                        if any(state in ("failed", "skipped") for state in states):
                            run.status = "skipped"
                            print(f"  skipped {run.name} (an input failed)", flush=True)
                            lock.notify_all()
                            break
                        run.status = "running"
                        return run
                else:
                    lock.wait()
            return None

    def slot() -> None:
        while (run := take()) is not None:
            try:
                execute(run, log_dir, pool)
            finally:
                if run.status == "running":
                    run.status = "failed"
                with lock:
                    lock.notify_all()
            print(f"  {run.status:7s} {run.name} ({run.seconds:.0f}s)", flush=True)

    threads = [threading.Thread(target=slot, daemon=True) for _ in range(max(1, jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclass(frozen=True)
class Pretraining:
    """One pretraining variant: its target and which streams' losses count."""

    name: str
    target: str  # tokenizer (trained), random (random-weight tokenizer), hog, pixel
    streams: str = "joint"  # joint, video-only, image-only
    frozen_embedding: bool = False  # run_pretraining.py --freeze_video_patch_embedding

    @property
    def label(self) -> str:
        target = {"tokenizer": "trained tokenizer", "random": "random tokenizer"}.get(
            self.target, self.target
        )
        return f"{self.streams}, {target}" + (", frozen tubelet embedding" if self.frozen_embedding else "")


def pretraining_variants(
    targets: list[str], ablation_target: str | None, frozen_targets: list[str] = ()
) -> list[Pretraining]:
    variants = [Pretraining(f"joint-{t}", t) for t in targets]
    variants += [Pretraining(f"joint-{t}-frozen", t, frozen_embedding=True) for t in frozen_targets]
    if ablation_target:
        frozen = ablation_target.endswith("-frozen")
        target = ablation_target.removesuffix("-frozen")
        variants += [
            Pretraining(f"{s}-{ablation_target}", target, s, frozen_embedding=frozen)
            for s in ("video-only", "image-only")
        ]
    return variants


def run_name(protocol: str, start: str, seed: int, finetune_tag: str | None = None) -> str:
    """`finetune-<start>-s<seed>` / `probe-<start>-s<seed>`; `--finetune_tag T` names the fine-tunings
    `finetune-T-<start>-s<seed>`, so that another fine-tuning recipe runs beside the first on the same pretrainings
    (the probes keep their names: their recipe is `--probe_lr` / `--probe_extra`)."""
    tag = f"-{finetune_tag}" if finetune_tag and protocol == "finetune" else ""
    return f"{protocol}{tag}-{start}-s{seed}"


def plan(
    args: argparse.Namespace, data: dict[str, str], work: Path
) -> tuple[list[list[Run]], dict]:
    """The phases of runs (tokenizers, pretrainings, fine-tunings) and the table's layout. `work`:
    `<output_dir>/runs-<split>`; `data`: the shard folders under `<output_dir>`."""
    variants = pretraining_variants(args.targets, args.ablation_target, args.frozen_embedding_targets)
    tokenizers, pretrainings, finetunings = [], [], []
    # the architecture of every new model (pretrainings, scratch); a pretraining folder's fine-tuning keeps its own
    model_overrides = ["--config_overrides", args.config_overrides] if args.config_overrides else []
    starts: dict[str, str] = {"scratch": "none (random init)"}
    for variant in variants:
        starts[variant.name] = variant.label
    for seed in args.seeds:
        tokenizer_dir = work / f"tokenizer-s{seed}"
        if any(v.target == "tokenizer" for v in variants):
            argv = ["--image_shards", data["images"], "--output_dir", str(tokenizer_dir), "--seed", str(seed),
                    "--max_train_steps", str(args.tokenizer_steps), "--logging_steps",
                    str(max(1, min(50, args.tokenizer_steps))), "--checkpointing_steps", str(10**6),
                    "--held_out_samples", str(min(64, args.sizes.unlabeled_images // 4)), *TOKENIZER_FLAGS]  # fmt: skip
            tokenizers.append(Run(f"tokenizer-s{seed}", "run_tokenizer_training.py", argv, tokenizer_dir))
        for variant in variants:
            out = work / f"pretrain-{variant.name}-s{seed}"
            argv = ["--video_shards", data["videos"], "--image_shards", data["images"], "--output_dir", str(out),
                    "--seed", str(seed), "--max_train_steps", str(args.pretrain_steps), "--logging_steps",
                    str(max(1, min(50, args.pretrain_steps))), "--checkpointing_steps", str(10**6),
                    *PRETRAIN_FLAGS, *args.pretrain_extra, *model_overrides]  # fmt: skip
            needs = []
            if variant.target == "tokenizer":
                argv += ["--tokenizer_name_or_path", str(tokenizer_dir)]
                needs.append(f"tokenizer-s{seed}")
            if variant.target == "random":
                argv += ["--target", "tokenizer", "--random_tokenizer"]
            else:
                argv += ["--target", variant.target]
            if variant.streams == "video-only":
                argv += ["--image_loss_weight", "0"]
            elif variant.streams == "image-only":
                argv += ["--video_loss_weight", "0"]
            if variant.frozen_embedding:
                argv += ["--freeze_video_patch_embedding"]
            pretrainings.append(
                Run(f"pretrain-{variant.name}-s{seed}", "run_pretraining.py", argv, out, needs)
            )
        for start in starts:
            for protocol in ("finetune", "probe"):
                name = run_name(protocol, start, seed, args.finetune_tag)
                out = work / name
                argv = ["--train_shards", data["train"], "--validation_shards", data[args.split], "--output_dir",
                        str(out), "--seed", str(seed), "--max_train_samples", str(args.labels), "--max_train_steps",
                        str(args.finetune_steps), "--eval_steps", str(args.finetune_steps), "--logging_steps",
                        str(max(1, min(50, args.finetune_steps))), "--checkpointing_steps", str(10**6),
                        "--num_warmup_steps", str(max(0, args.finetune_steps // 10)), *FINETUNE_FLAGS]  # fmt: skip
                if protocol == "finetune":
                    argv += [
                        "--learning_rate",
                        args.finetune_lr,
                        "--label_smoothing",
                        FINETUNE_LABEL_SMOOTHING,
                    ]
                    argv += args.finetune_extra
                else:
                    argv += ["--linear_probe", "--learning_rate", args.probe_lr, *args.probe_extra]
                needs = []
                if start == "scratch":
                    argv += ["--window_size", "4", "2", "2", *model_overrides]
                else:
                    argv += ["--model_name_or_path", str(work / f"pretrain-{start}-s{seed}")]
                    needs.append(f"pretrain-{start}-s{seed}")
                finetunings.append(Run(name, "run_finetuning.py", argv, out, needs))
    for run in (*tokenizers, *pretrainings, *finetunings):
        run.root = work.parent  # <output_dir>: the data and every run folder are under it
    layout = {"starts": starts}
    return [tokenizers, pretrainings, finetunings], layout


def assign_versions(phases: list[list[Run]], fingerprint: str) -> None:
    """Every run's `data_version`: the data fingerprint and the keys of the runs it needs (in phase order, so the
    inputs have theirs first). A run whose input changed (a pretraining run with other flags, a retrained
    tokenizer) gets a new key and runs again instead of being reused with stale results."""
    by_name = {run.name: run for phase in phases for run in phase}
    for phase in phases:
        for run in phase:
            run.data_version = ":".join([fingerprint, *(by_name[name].key for name in run.needs)])


def seed_major(phases: list[list[Run]], seeds: list[int]) -> list[Run]:
    """Every run of a seed before the next seed's (a cut-off run leaves whole seeds), scratch runs of the seed first
    (no inputs), then tokenizers, pretrainings and their fine-tunings."""
    ordered = []
    for seed in seeds:
        tail = f"-s{seed}"
        mine = [run for phase in phases for run in phase if run.name.endswith(tail)]
        ordered += [r for r in mine if not r.needs and r.script == "run_finetuning.py"]
        ordered += [r for r in mine if r.script != "run_finetuning.py"]
        ordered += [r for r in mine if r.needs and r.script == "run_finetuning.py"]
    return ordered


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def _top1(run: Run | None) -> float | None:
    if run is None or run.status not in ("done", "reused"):
        return None
    history = run.output_dir / "eval_history.json"
    if not history.is_file():
        return None
    return float(json.loads(history.read_text())[-1]["top1_accuracy"])


def _final_window(run: Run | None) -> dict | None:
    """The metrics of a finished run's last logging window (its training_results.json: run_pretraining.py's masked
    R^2 / accuracy, run_finetuning.py's training loss and accuracy)."""
    if run is None or run.status not in ("done", "reused"):
        return None
    path = run.output_dir / "training_results.json"
    return json.loads(path.read_text()).get("final_window") if path.is_file() else None


def _train_accuracy(run: Run | None) -> float | None:
    """A fine-tuning's training-clip accuracy over its last logging window: how well the labeled subset was fitted,
    to read beside the held-out top-1 (the generalisation gap)."""
    value = (_final_window(run) or {}).get("accuracy")
    return None if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], expected: int) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "n/a"
    missing = f" ({len(values)}/{expected} seeds)" if len(values) < expected else ""
    return f"{100 * mean:.1f} ± {100 * std:.1f}{missing}"


def collect(args: argparse.Namespace, runs: dict[str, Run], layout: dict, work: Path) -> dict:
    rows = []
    for start, label in layout["starts"].items():
        row = {"start": start, "pretraining": label}
        for protocol in ("finetune", "probe"):
            names = {s: run_name(protocol, start, s, args.finetune_tag) for s in args.seeds}
            per_seed = {s: _top1(runs.get(names[s])) for s in args.seeds}
            row[protocol] = {"per_seed": per_seed, "values": [v for v in per_seed.values() if v is not None]}
            row[protocol]["mean"], row[protocol]["std"] = _mean_std(row[protocol]["values"])
            fitted = {s: _train_accuracy(runs.get(names[s])) for s in args.seeds}
            row[protocol]["train_accuracy"] = {"per_seed": fitted, "values": [v for v in fitted.values() if v is not None]}
        if start != "scratch":
            row["pretraining_final"] = {
                s: _final_window(runs.get(f"pretrain-{start}-s{s}")) for s in args.seeds
            }
        rows.append(row)
    tokenizers = {}
    for seed in args.seeds:
        path = work / f"tokenizer-s{seed}" / "training_results.json"
        if path.is_file():
            tokenizers[seed] = json.loads(path.read_text())["held_out"]
    return {"rows": rows, "tokenizers": tokenizers}


def paired_delta(row: dict, base: dict, protocol: str, seeds: list[int]) -> str:
    """Mean +- std over seeds of (row - base) on the same seed (same labeled subset and fine-tuning seed)."""
    deltas = [row[protocol]["per_seed"][s] - base[protocol]["per_seed"][s] for s in seeds
              if row[protocol]["per_seed"][s] is not None and base[protocol]["per_seed"][s] is not None]  # fmt: skip
    mean, std = _mean_std(deltas)
    return "n/a" if mean is None else f"{100 * mean:+.1f} ± {100 * std:.1f}"


def markdown(args: argparse.Namespace, results: dict, meta: dict) -> str:
    seeds = len(args.seeds)
    rows = results["rows"]
    base = rows[0]
    lines = [
        f"# Transfer benchmark ({args.split} split)",
        "",
        f"Top-1 (%) on the {args.split} split ({meta['num_scored']} clips, {meta['num_classes']} classes, chance "
        f"{100 / meta['num_classes']:.1f}), mean ± std over "
        f"seeds {', '.join(map(str, args.seeds))}; {args.labels} labeled clips; {args.finetune_steps} fine-tuning / "
        f"probing steps; {args.pretrain_steps} pretraining steps; Δ = paired difference to the scratch row "
        "(same seed: same labeled subset). Model: preset test"
        + (f" with {args.config_overrides}" if args.config_overrides else "")
        + ".",
        "",
        f"Fine-tuning recipe{' ' + repr(args.finetune_tag) if args.finetune_tag else ''}: learning rate "
        f"{args.finetune_lr}{', ' + ' '.join(args.finetune_extra) if args.finetune_extra else ''}; linear probe: "
        f"learning rate {args.probe_lr}{', ' + ' '.join(args.probe_extra) if args.probe_extra else ''}.",
        "",
        "| start (pretraining streams, target) | fine-tune top-1 | Δ vs scratch | fine-tune, training-clip accuracy (last steps) | linear probe top-1 | Δ vs random-init probe | pretraining, masked video / image (last steps) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        finals = [f for f in (row.get("pretraining_final") or {}).values() if f]
        masked = "—"
        if finals:
            kind = "r2" if any("video_mask_r2" in f or "image_mask_r2" in f for f in finals) else "accuracy"
            video = statistics.fmean(f.get(f"video_mask_{kind}", math.nan) for f in finals)
            image = statistics.fmean(f.get(f"image_mask_{kind}", math.nan) for f in finals)
            masked = f"{'R² ' if kind == 'r2' else 'acc '}{video:.2f} / {image:.2f}"
        is_base = row is base
        lines.append(
            f"| {row['pretraining']} | {_cell(row['finetune']['values'], seeds)} | "
            f"{'—' if is_base else paired_delta(row, base, 'finetune', args.seeds)} | "
            f"{_cell(row['finetune']['train_accuracy']['values'], seeds)} | {_cell(row['probe']['values'], seeds)} | "
            f"{'—' if is_base else paired_delta(row, base, 'probe', args.seeds)} | {masked} |"
        )

    def per_seed(values: dict[int, float | None]) -> str:
        return " / ".join("n/a" if values.get(s) is None else f"{100 * values[s]:.1f}" for s in args.seeds)

    lines += [
        "",
        f"Per seed ({' / '.join(map(str, args.seeds))}), %:",
        "",
        "| start | fine-tune top-1 | fine-tune, training-clip accuracy | linear probe top-1 |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['pretraining']} | {per_seed(row['finetune']['per_seed'])} | "
            f"{per_seed(row['finetune']['train_accuracy']['per_seed'])} | {per_seed(row['probe']['per_seed'])} |"
        )
    if results["tokenizers"]:
        psnr = statistics.fmean(t["psnr"] for t in results["tokenizers"].values())
        base_psnr = statistics.fmean(t["mean_colour_psnr"] for t in results["tokenizers"].values())
        usage = statistics.fmean(t["codebook_usage"] for t in results["tokenizers"].values())
        lines += ["", f"Trained tokenizer ({args.tokenizer_steps} steps, 64 codes): held-out PSNR {psnr:.2f} dB "
                  f"(mean-colour baseline {base_psnr:.2f} dB), codebook usage {usage:.2f}."]  # fmt: skip
    lines += ["", f"Command: `{meta['command']}`", run_provenance_line(meta)]
    return "\n".join(lines) + "\n"


def provenance(runs: Iterable[Run]) -> dict:
    """When, where and for how long the table's finished runs (done now or reused) ran, from their markers:
    `runs_finished` [first, last] (UTC), `run_machines` (the recorded machines, plus "not recorded" when some
    runs' markers predate the record), `run_seconds` (summed), `runs_now` / `runs_reused` (counts)."""
    finished = [run for run in runs if run.status in ("done", "reused") and run.marker.is_file()]
    records = [run.record() for run in finished]
    machines = sorted({r["machine"] for r in records if r["machine"]})
    return {
        "runs_finished": [min(r["finished"] for r in records), max(r["finished"] for r in records)] if records else None,
        "run_machines": machines + (["not recorded"] if any(not r["machine"] for r in records) else []),
        "run_seconds": round(sum(r["seconds"] for r in records), 1),
        "runs_now": sum(run.status == "done" for run in finished),
        "runs_reused": sum(run.status == "reused" for run in finished),
    }


def run_provenance_line(meta: dict) -> str:
    """The table's last line: the runs' own dates, machines and run time (a --report_only or a rerun that reused
    runs does not stamp them with its own date), then this invocation's."""
    if meta["runs_finished"]:
        first, last = meta["runs_finished"]
        span = first if first == last else f"{first} to {last}"
        runs = (f"Runs finished {span} UTC on {' / '.join(meta['run_machines'])}; {meta['run_seconds'] / 60:.1f} min "
                f"of run time ({meta['jobs']} at a time). ")  # fmt: skip
    else:
        runs = "No finished runs. "
    return (f"{runs}This table: {meta['date']} on {meta['machine']}, {meta['runs_now']} runs now and "
            f"{meta['runs_reused']} reused, {meta['wall_s'] / 60:.1f} min.")  # fmt: skip


@lru_cache(maxsize=1)
def machine() -> str:
    """CPU model, instruction sets and CPU count (`bevt.kernels_bevt.cpu_info`): every finished run's marker records it."""
    from bevt.kernels_bevt import cpu_info

    cpu = cpu_info()
    flags = ", ".join(f for f in ("avx2", "avx512f", "amx_bf16") if f in cpu["flags"])
    return f"{cpu['model']} ({platform.machine()}{', ' + flags if flags else ''}), {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


class _Skip(Exception):
    """--report_only: nothing to run."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", default="outputs/transfer", help="Data, runs, logs and the table.")
    p.add_argument("--task", choices=TASKS, default="shapes", help="Clip generator (see make_task_clip).")
    p.add_argument("--split", choices=("eval", "dev"), default="eval", help="Scored split (dev: for tuning).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--labels", type=int, default=64, help="Labeled clips per fine-tuning (class-balanced subset)."
    )
    p.add_argument("--targets", nargs="*", default=["tokenizer", "hog", "pixel", "random"],
                   choices=("tokenizer", "hog", "pixel", "random"), help="Joint-pretraining targets.")  # fmt: skip
    p.add_argument("--frozen_embedding_targets", nargs="*", default=["tokenizer", "pixel", "random"],
                   choices=("tokenizer", "hog", "pixel", "random"),
                   help="Joint-pretraining targets run again with --freeze_video_patch_embedding.")  # fmt: skip
    p.add_argument(
        "--ablation_target",
        default="hog",
        help="Target of the video-only / image-only ablation, e.g. hog or pixel-frozen ('' skips it).",
    )
    p.add_argument("--tokenizer_steps", type=int, default=100)
    p.add_argument("--pretrain_steps", type=int, default=600)
    p.add_argument(
        "--finetune_steps", type=int, default=300, help="Steps of every fine-tuning and linear probe."
    )
    p.add_argument("--finetune_lr", default=FINETUNE_LR)
    p.add_argument("--probe_lr", default=PROBE_LR)
    p.add_argument(
        "--pretrain_extra", default="", help="More run_pretraining.py flags (one string, for dev runs)."
    )
    p.add_argument("--finetune_extra", default="", help="More run_finetuning.py flags for the fine-tunings.")
    p.add_argument(
        "--config_overrides",
        default=None,
        help='Architecture of every new model (pretrainings and scratch starts; preset test otherwise), e.g. '
        '"embed_dim=64": both scripts\' --config_overrides.',
    )
    p.add_argument(
        "--finetune_tag",
        default=None,
        help="Name another fine-tuning recipe (--finetune_lr / --finetune_extra): its runs are finetune-TAG-<start>-s<seed> "
        "beside the first recipe's, on the same pretrainings; the table reports them.",
    )
    p.add_argument("--probe_extra", default="", help="More run_finetuning.py flags for the linear probes.")
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1),
        help="Runs at a time, each on one thread (default: one per CPU this process may use).",
    )
    p.add_argument(
        "--subprocess",
        action="store_true",
        help="Every run a fresh `python run_*.py ...` process (default: "
        "`--jobs` worker processes call the scripts' main(argv), saving the ~10-20 s import of each run).",
    )
    p.add_argument(
        "--report_only", action="store_true", help="Write the table from the finished runs; run nothing."
    )
    p.add_argument(
        "--unlabeled_videos", type=int, default=DataSizes.unlabeled_videos,
        help="Unlabeled pretraining clips (of the same generator, disjoint seeds from the labeled splits).",
    )
    p.add_argument(
        "--unlabeled_images", type=int, default=DataSizes.unlabeled_images, help="Unlabeled pretraining frames."
    )
    p.add_argument(
        "--smoke", action="store_true", help="Tiny data and budgets, one seed: checks it runs (CI)."
    )
    args = p.parse_args(argv)
    for name in ("unlabeled_videos", "unlabeled_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.ablation_target = args.ablation_target or None
    if args.finetune_tag is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", args.finetune_tag):
        p.error(f"--finetune_tag must be letters, digits, '.', '_' or '-' (it names run folders), got {args.finetune_tag!r}")
    if args.smoke:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
        args.labels, args.tokenizer_steps, args.pretrain_steps, args.finetune_steps = 8, 2, 2, 2
        args.sizes = DataSizes(unlabeled_videos=8, unlabeled_images=16, train=16, dev=8, eval=8)
    else:
        args.sizes = DataSizes(unlabeled_videos=args.unlabeled_videos, unlabeled_images=args.unlabeled_images)
    for name in ("pretrain_extra", "finetune_extra", "probe_extra"):
        setattr(args, name, shlex.split(getattr(args, name)))
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    global TASK
    TASK = args.task
    started = time.perf_counter()
    out = Path(args.output_dir).resolve()
    work, logs = out / f"runs-{args.split}", out / f"logs-{args.split}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"writing the task data under {out / f'data-{args.task}'} ...", flush=True)
    data = write_task_data(
        out / f"data-{args.task}", args.sizes, ("videos", "images", "train", args.split), jobs=args.jobs
    )
    phases, layout = plan(args, data, work)
    runs = {run.name: run for phase in phases for run in phase}
    fingerprint = hashlib.sha256(
        "".join(sorted((out / f"data-{args.task}" / f"{split}.json").read_text() for split in data)).encode()
    ).hexdigest()[:16]
    assign_versions(phases, fingerprint)
    os.environ.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )  # for the workers
    pool = None
    if args.report_only:
        for run in runs.values():
            if run.finished_before():
                run.mark_reused()
            else:
                run.status = "missing"
    elif not args.subprocess:
        import multiprocessing

        pool = ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )

        def stop(signum: int, _frame: object) -> None:  # the workers do not outlive a killed benchmark
            for process in list((pool._processes or {}).values()):
                process.kill()
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    try:
        if args.report_only:
            raise _Skip
        kinds = ("tokenizers", "pretrainings", "fine-tunings / linear probes")
        print(", ".join(f"{len(p)} {k}" for p, k in zip(phases, kinds, strict=True)), flush=True)
        run_all(seed_major(phases, args.seeds), logs, args.jobs, pool)
    except _Skip:
        pass
    finally:
        if pool is not None:
            pool.shutdown()
    results = collect(args, runs, layout, work)
    meta = {
        "command": shlex.join(["python", "benchmarks/transfer.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
        "jobs": args.jobs,
        "num_scored": getattr(args.sizes, args.split),
        "num_classes": len(class_names()),
        **provenance(runs.values()),
    }
    table = markdown(args, results, meta)
    (out / f"transfer_{args.split}.md").write_text(table)
    report = {**meta, "settings": {k: v for k, v in vars(args).items() if k != "sizes"}, "sizes": args.sizes.__dict__,
              "pretrain_flags": PRETRAIN_FLAGS, "finetune_flags": FINETUNE_FLAGS, **results,
              "runs": {n: {"status": r.status, "seconds": r.seconds} for n, r in runs.items()}}  # fmt: skip
    (out / f"transfer_{args.split}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n" + table, flush=True)
    failed = [name for name, run in runs.items() if run.status in ("failed", "skipped", "missing")]
    if failed:
        print(f"{len(failed)} runs failed or were skipped: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
