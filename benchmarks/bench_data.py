"""Data-loading throughput for BEVT pretraining clips: clips/s per core, side by side.

Every path reads the same videos and decodes the same sampled windows (16 frames, interval 8 by default):

* ``decode``        the floor: ``bevt.video_decoding.VideoReader`` on the encoded bytes + frame sampling +
                    decoding of the sampled frames, nothing else.
* ``bevt``          the training path: shards -> ``build_stream`` (datasets' webdataset reader, block shuffle)
                    -> decode -> ``PretrainingVideoTransform`` (random rescale 256-320, crop 224, flip, and
                    the 112 Lanczos tokenizer copy).
* ``transformers``  ``transformers.video_utils.load_video`` (decord, same windows) + ``VideoMAEVideoProcessor``
                    (resize 224, centre crop, normalise) on the original files.
* ``decode-reenc`` / ``bevt-reenc``: the same on shards written with ``make_shards --reencode``.
* ``bevt-http`` / ``bevt-reenc-http``: the bevt path on the same shards served over HTTP from 127.0.0.1
                    (``python -m http.server`` in another process, so its CPU time is not counted here):
                    ``build_stream("http://127.0.0.1:PORT/orig")``, streamed through ``bevt.data.storage``.

Cost is CPU time of this process (all its threads; ``time.process_time``), so "clips/s per core" is
``clips / CPU-seconds`` and does not depend on other load on the machine or on library threading. Paths are
interleaved over several rounds and the median round is reported.

Usage::

    python benchmarks/bench_data.py                      # the shared test videos, 4 copies each, 3 rounds
    python benchmarks/bench_data.py --videos DIR --copies 2 --rounds 5 --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bevt.data.make_shards import reencode_video
from bevt.data.shards import write_shards
from bevt.data.streaming import build_stream
from bevt.data.transforms import PretrainingVideoTransform, derive_seed
from bevt.frame_sampling import sample_frame_indices
from bevt.video_decoding import VideoReader

DEFAULT_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
SEED = 0


def _window(num_frames: int, key: str, args: argparse.Namespace) -> list[int]:
    """The window the stream samples for ``key`` in epoch 0 (its generator's first draw)."""
    generator = torch.Generator().manual_seed(derive_seed(SEED, 0, key))
    return sample_frame_indices(
        num_frames,
        mode="dense",
        clip_len=args.clip_len,
        frame_interval=args.frame_interval,
        generator=generator,
    )[0]


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on 127.0.0.1 serving ``folder`` (another process); returns it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return server, url
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("the benchmark's HTTP server did not start")


def _measure(fn: Callable[[], int]) -> tuple[float, float, int]:
    """Run ``fn`` (returns clips done): (CPU seconds, wall seconds, clips)."""
    cpu, wall = time.process_time(), time.perf_counter()
    clips = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, clips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS, help="folder of .mp4/.avi/.webm/.mkv files")
    p.add_argument("--copies", type=int, default=4, help="samples per video (different keys, hence windows)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--frame-interval", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--short-side", type=int, default=256, help="--reencode short side")
    p.add_argument("--gop", type=int, default=16, help="--reencode keyframe interval")
    p.add_argument("--backend", default="decord", help="video backend of the bevt and transformers paths")
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    os.environ.setdefault("BEVT_VIDEO_BACKEND", args.backend)
    files = sorted(f for f in args.videos.iterdir() if f.suffix.lower() in (".mp4", ".avi", ".webm", ".mkv"))
    if not files:
        print(f"no videos in {args.videos}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    originals = {f: f.read_bytes() for f in files}
    reencoded = {
        f: reencode_video(data, short_side=args.short_side, gop=args.gop)[0] for f, data in originals.items()
    }
    samples = [(f"{c:03d}_{f.stem.replace('.', '_')}", f) for c in range(args.copies) for f in files]
    for name, blobs in (("orig", originals), ("reenc", reencoded)):
        write_shards(
            [(key, "mp4" if name == "reenc" else f.suffix[1:], blobs[f], {"label": 0}) for key, f in samples],
            tmp / name,
            num_shards=2,
            kind="video",
        )
    transform = PretrainingVideoTransform(image_size=args.image_size)

    def decode(blobs: dict[Path, bytes]) -> Callable[[], int]:
        def run() -> int:
            for key, f in samples:
                with VideoReader(blobs[f], backend=args.backend, num_threads=1) as reader:
                    reader.get_batch(_window(reader.num_frames, key, args))
            return len(samples)

        return run

    server, base_url = _serve(tmp)

    def bevt(name: str, location: str | Path | None = None) -> Callable[[], int]:
        def run() -> int:
            stream = build_stream(
                location or tmp / name,
                transform=transform,
                clip_len=args.clip_len,
                frame_interval=args.frame_interval,
                shuffle_buffer=8,
                seed=SEED,
                backend=args.backend,
            )
            n = 0
            for sample in stream:
                assert sample["pixel_values"].shape == (args.clip_len, 3, args.image_size, args.image_size)
                n += 1
            return n

        return run

    def transformers_path() -> int:
        from transformers import VideoMAEVideoProcessor
        from transformers.video_utils import load_video

        processor = VideoMAEVideoProcessor()
        for key, f in samples:

            def indices(metadata, key=key, **_):
                return np.asarray(_window(metadata.total_num_frames, key, args))

            video, _ = load_video(str(f), backend=args.backend, sample_indices_fn=indices)
            out = processor(list(video), return_tensors="pt")
            assert out["pixel_values"].shape[1] == args.clip_len
        return len(samples)

    paths: dict[str, Callable[[], int]] = {
        "decode": decode(originals),
        "bevt": bevt("orig"),
        "transformers": transformers_path,
        "decode-reenc": decode(reencoded),
        "bevt-reenc": bevt("reenc"),
        "bevt-http": bevt("orig", f"{base_url}/orig"),
        "bevt-reenc-http": bevt("reenc", f"{base_url}/reenc"),
    }
    try:
        for fn in paths.values():  # warm-up: imports, first-call costs
            fn()
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                results[name].append(_measure(fn))
    finally:
        server.kill()
        server.wait()

    rows = {}
    for name, runs in results.items():
        cpu_ms = statistics.median(c / n * 1000 for c, _, n in runs)
        wall_ms = statistics.median(w / n * 1000 for _, w, n in runs)
        rows[name] = {
            "cpu_ms_per_clip": cpu_ms,
            "clips_per_s_per_core": 1000 / cpu_ms,
            "wall_ms_per_clip": wall_ms,
        }
    ratios = {
        "bevt_cost_over_decode": rows["bevt"]["cpu_ms_per_clip"] / rows["decode"]["cpu_ms_per_clip"],
        "bevt_speed_over_transformers": rows["bevt"]["clips_per_s_per_core"]
        / rows["transformers"]["clips_per_s_per_core"],
        "reencoded_speedup": rows["bevt-reenc"]["clips_per_s_per_core"]
        / rows["bevt"]["clips_per_s_per_core"],
        "bevt_reenc_cost_over_decode_reenc": rows["bevt-reenc"]["cpu_ms_per_clip"]
        / rows["decode-reenc"]["cpu_ms_per_clip"],
        "http_over_local_clips_per_s": rows["bevt-http"]["clips_per_s_per_core"]
        / rows["bevt"]["clips_per_s_per_core"],
        "http_over_local_clips_per_s_reenc": rows["bevt-reenc-http"]["clips_per_s_per_core"]
        / rows["bevt-reenc"]["clips_per_s_per_core"],
        "http_over_local_wall_reenc": rows["bevt-reenc"]["wall_ms_per_clip"]
        / rows["bevt-reenc-http"]["wall_ms_per_clip"],
    }
    print(
        f"{len(samples)} clips of {args.clip_len}x{args.frame_interval} from {len(files)} videos, "
        f"{args.image_size}px, backend {args.backend}, {args.rounds} rounds (median)"
    )
    print(f"{'path':<16} {'CPU ms/clip':>12} {'clips/s/core':>13} {'wall ms/clip':>13}")
    for name, row in rows.items():
        print(
            f"{name:<16} {row['cpu_ms_per_clip']:>12.1f} {row['clips_per_s_per_core']:>13.2f} "
            f"{row['wall_ms_per_clip']:>13.1f}"
        )
    print(f"bevt cost / decode alone:          {ratios['bevt_cost_over_decode']:.2f}  (target <= 1.2)")
    print(f"bevt clips/s / transformers:       {ratios['bevt_speed_over_transformers']:.2f}  (target >= 1.0)")
    print(f"re-encoded / original (bevt):      {ratios['reencoded_speedup']:.2f}  (target >= 2.0)")
    print(f"bevt cost / decode (re-encoded):   {ratios['bevt_reenc_cost_over_decode_reenc']:.2f}")
    print(f"HTTP / local clips/s per core:     {ratios['http_over_local_clips_per_s']:.2f} (original), "
          f"{ratios['http_over_local_clips_per_s_reenc']:.2f} (re-encoded)")
    print(f"HTTP / local clips/s (wall, re-encoded): {ratios['http_over_local_wall_reenc']:.2f}")
    sizes = {
        name: sum(len(b) for b in blobs.values())
        for name, blobs in (("orig", originals), ("reenc", reencoded))
    }
    print(
        f"bytes: original {sizes['orig'] / 2**20:.2f} MiB, re-encoded {sizes['reenc'] / 2**20:.2f} MiB "
        f"(short side {args.short_side}, gop {args.gop})"
    )
    if args.output_json:
        args.output_json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "ratios": ratios,
                    "bytes": sizes,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
