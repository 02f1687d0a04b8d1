"""Shards from anywhere (bevt.data.storage): HTTP with faults, fsspec (memory://, a flaky one), hf:// offline.

The HTTP tests serve real shards from a server on 127.0.0.1 started here (`shard_server.ShardServer`, a thread
that stops with the test, or by itself after two minutes), with faults injected per file: connections cut in the
middle of a shard, 503 answers, stalls past the client timeout, a slow server, no range requests, a shard that
never answers. Every stream must yield exactly the samples of a local read of the same shards (keys, seeds,
decoded frames), in the same order for the same seed, with the same counts.

`hf://` is tested offline: `huggingface_hub.HfFileSystem` and `HfApi` (the real classes) are pointed at
`shard_server.FakeHub`, a local stand-in for the Hub endpoints they call to list, read and write a dataset repository
(revision, tree, paths-info, resolve; preupload and commit with every file inline). It is not the Hub: LFS / Xet
uploads, rate limits and permissions are not exercised.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from safetensors.torch import load_file
from shard_server import FakeHub, Fault, ShardServer
from test_shards import encode_video

from bevt.data import make_shards as make_shards_cli
from bevt.data.demo_pretraining import write_demo_pretraining_shards
from bevt.data.shards import (
    LabelMismatchError,
    check_label_consistency,
    find_label_names,
    iter_shard,
    list_shards,
    load_dataset_info,
    read_labels,
    write_shards,
)
from bevt.data.storage import ShardAccess, cache_path, expand_braces, normalize
from bevt.data.streaming import DataQualityError, StreamDataLoader, build_stream
from bevt.pretraining import PretrainingData, PretrainingDataConfig

NUM_SHARDS, PER_SHARD = 3, 4
LABELS = ["jump", "run", "swim"]
STREAM = dict(clip_len=4, frame_interval=2, shuffle_buffer=3, seed=5)
FAST = dict(retry_wait=0.01, timeout=0.3)  # retries in tests: no real backoff


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ds/train`: 3 shards of 4 labelled videos (+ dataset_info.json, labels.txt), served by the tests."""
    out = tmp_path_factory.mktemp("remote")
    samples = [
        (f"v{i:02d}", "mp4", encode_video(12, seed=i), {"label": i % 3, "label_name": LABELS[i % 3]})
        for i in range(NUM_SHARDS * PER_SHARD)
    ]
    write_shards(samples, out / "ds" / "train", num_shards=NUM_SHARDS, kind="video", labels=LABELS)
    return out


def _samples(stream) -> list[tuple[str, int, int, torch.Tensor]]:
    return [(s["__key__"], s["seed"], s["labels"], s["pixel_values"]) for s in stream]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def local(root: Path) -> list:
    """The reference: a local read of the same shards with the same settings."""
    return _samples(build_stream(root / "ds" / "train", **STREAM))


def _shard_names(root: Path) -> list[str]:
    return [f"ds/train/{p.name}" for p in sorted((root / "ds" / "train").glob("*.tar"))]


# ------------------------------------------------------------------------------------------ HTTP


MODES = {
    "plain": dict(),
    "no_ranges": dict(ranges=False),
    "dropped_mid_shard": dict(faults={"*": Fault(drop_after=6000, drop_times=2)}),
    "dropped_no_ranges": dict(ranges=False, faults={"*": Fault(drop_after=6000, drop_times=2)}),
    "503_three_times": dict(faults={"*": Fault(status=503, status_times=3)}),
    "timeout_then_answers": dict(faults={"*": Fault(stall=1.0, stall_times=1)}),
    "slow": dict(faults={"*": Fault(delay=0.01)}),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_http_stream_yields_exactly_the_local_samples(root: Path, local: list, mode: str):
    with ShardServer(root, **MODES[mode]) as server:
        stream = build_stream(f"{server.url}/ds/train", **STREAM, **FAST)
        assert stream.files == [f"{server.url}/{name}" for name in _shard_names(root)]
        assert stream.total_examples == NUM_SHARDS * PER_SHARD
        got = _samples(stream)
    assert _same(got, local), f"{mode}: {[g[0] for g in got]} != {[x[0] for x in local]}"
    assert stream.stats.as_dict() == {"ok": NUM_SHARDS * PER_SHARD}
    sizes = {name: (root / name).stat().st_size for name in _shard_names(root)}
    if mode == "dropped_mid_shard":  # resumed at the byte: every byte of a shard was sent exactly once
        assert server.range_requests >= 2 * NUM_SHARDS
        assert {name: server.bytes_sent[name] for name in sizes} == sizes
    if mode == "dropped_no_ranges":  # no range requests: the shard restarted, the bytes read were skipped
        assert server.range_requests == 0
        assert all(server.bytes_sent[name] > size for name, size in sizes.items())
    if mode in ("503_three_times", "timeout_then_answers"):
        assert all(server.requests[name] >= 2 for name in sizes)


def test_shard_that_never_answers_is_skipped_and_counted(root: Path, local: list):
    names = _shard_names(root)
    kwargs = dict(STREAM, shuffle_buffer=0, shuffle_shards=False, timeout=0.2, max_retries=1, retry_wait=0.01)
    reference = _samples(build_stream(root / "ds" / "train", **kwargs))
    with ShardServer(root, faults={names[1]: Fault(hang=True)}) as server:
        stream = build_stream(f"{server.url}/ds/train", **kwargs)
        got = _samples(stream)
    lost = {f"v{i:02d}" for i in range(PER_SHARD, 2 * PER_SHARD)}  # the second shard's videos
    assert _same(got, [r for r in reference if r[0] not in lost])
    assert stream.stats.as_dict() == {"ok": 2 * PER_SHARD, "shard_unavailable": 1}
    assert server.requests[names[1]] == 2  # one try + one retry

    with ShardServer(root, faults={name: Fault(hang=True) for name in names}) as server:  # every shard
        with pytest.raises(DataQualityError, match="no sample of epoch 0 could be loaded.*shard_unavailable 3"):
            list(build_stream(f"{server.url}/ds/train", **kwargs))


def test_connection_cut_for_good_mid_shard_keeps_the_samples_before_it(root: Path):
    names = _shard_names(root)
    kwargs = dict(STREAM, shuffle_buffer=0, shuffle_shards=False, max_retries=2, retry_wait=0.01)
    reference = [s[0] for s in _samples(build_stream(root / "ds" / "train", **kwargs))]
    with ShardServer(root, faults={names[0]: Fault(drop_after=9000, drop_times=100)}) as server:
        stream = build_stream(f"{server.url}/ds/train", **kwargs)
        keys = [s[0] for s in _samples(stream)]
    first = reference[:PER_SHARD]
    kept = [k for k in keys if k in first]
    assert 0 < len(kept) < PER_SHARD and kept == first[: len(kept)]  # a prefix of that shard, nothing twice
    assert keys == kept + reference[PER_SHARD:]
    assert stream.stats.failed == {"shard_unavailable": 1}
    assert server.requests[names[0]] == 3  # at the cut: one try + two retries


class _RedirectingServer(ShardServer):
    """Redirects ``/elsewhere/<path>`` to ``http://localhost:<port>/<path>`` (another host name for the same server)
    and records the ``Authorization`` header of every request by host."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.auth: list[tuple[str, str | None]] = []

    def handle_other(self, handler, method: str) -> bool:
        self.auth.append((handler.headers.get("Host", "").split(":")[0], handler.headers.get("Authorization")))
        if not handler.path.startswith("/elsewhere/"):
            return False
        port = self.url.rsplit(":", 1)[1]
        handler.send_response(302)
        handler.send_header("Location", f"http://localhost:{port}/{handler.path[len('/elsewhere/'):]}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return True


def test_redirects_keep_credentials_on_their_host(root: Path, local: list):
    with _RedirectingServer(root) as server:
        options = {"headers": {"Authorization": "Bearer secret"}}
        urls = [f"{server.url}/elsewhere/{name}" for name in _shard_names(root)]
        stream = build_stream(urls, kind="video", storage_options=options, **STREAM, **FAST)
        assert _same(_samples(stream), local)
    hosts = {host: {auth for h, auth in server.auth if h == host} for host, _ in server.auth}
    assert hosts == {"127.0.0.1": {"Bearer secret"}, "localhost": {None}}


def test_missing_shard_is_a_shard_error_without_retries(root: Path):
    with ShardServer(root) as server:
        urls = [f"{server.url}/ds/train/shard-00000.tar", f"{server.url}/ds/train/shard-00099.tar"]
        stream = build_stream(urls, **STREAM, **FAST)
        assert len(_samples(stream)) == PER_SHARD
        assert stream.stats.failed == {"shard_error": 1}
        assert server.statuses[404] == 1  # asked once, not retried
        assert "HTTP 404" in stream.stats.recent[-1][3]


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_resume_mid_shard_over_http_is_exact(root: Path):
    kwargs = dict(STREAM, repeat=True, **FAST)
    total = NUM_SHARDS * PER_SHARD + 5  # into the second epoch
    with ShardServer(root, faults={"*": Fault(drop_after=7000, drop_times=1)}) as server:
        url = f"{server.url}/ds/train"
        expected = _samples(_take(iter(build_stream(url, **kwargs)), total))
        stream = build_stream(url, **kwargs)
        head = _samples(_take(iter(stream), 6))  # mid-shard: the second block of 3, the second shard
        state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint stores
        server.faults["*"] = Fault(status=503, status_times=10**6)  # the old connections are gone for good
    with ShardServer(root, ranges=False, faults={"*": Fault(drop_after=5000, drop_times=1)}) as other:
        resumed = build_stream(f"{other.url}/ds/train", **kwargs)  # same shard names, another server
        resumed.load_state_dict(state)
        tail = _samples(_take(iter(resumed), total - 6))
    assert _same(head + tail, expected)


def test_loader_with_workers_over_http_resumes_exactly(root: Path):
    kwargs = dict(STREAM, repeat=False, **FAST)
    with ShardServer(root, faults={"*": Fault(drop_after=7000, drop_times=1)}) as server:
        url = f"{server.url}/ds/train"
        loader = StreamDataLoader(build_stream(url, **kwargs), batch_size=2, num_workers=2)
        expected = [b["__key__"] for b in loader]
        loader = StreamDataLoader(build_stream(url, **kwargs), batch_size=2, num_workers=2)
        it = iter(loader)
        head = [next(it)["__key__"] for _ in range(3)]
        state = loader.state_dict()
        del it
        resumed = StreamDataLoader(build_stream(url, **kwargs), batch_size=2, num_workers=2)
        resumed.load_state_dict(state)
        tail = [b["__key__"] for b in resumed]
    assert head + tail == expected
    assert sorted(k for batch in expected for k in batch) == [f"v{i:02d}" for i in range(NUM_SHARDS * PER_SHARD)]
    assert resumed.stats.as_dict() == {"ok": NUM_SHARDS * PER_SHARD}


def _stream_and_record(url: str, log: str) -> None:
    """The process to kill: streams over HTTP and appends each sample's key, frame digest and the stream state."""
    stream = build_stream(url, **STREAM, repeat=True, retry_wait=0.01)
    with open(log, "a") as f:
        for sample in stream:
            line = {"sample": _digest(sample), "state": stream.state_dict()}
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
            time.sleep(0.1)


def _digest(sample: dict) -> list[str]:
    return [sample["__key__"], hashlib.sha1(sample["pixel_values"].numpy().tobytes()).hexdigest()]


def test_kill_9_mid_shard_then_resume_from_the_saved_state(root: Path, tmp_path: Path):
    """A process streaming over HTTP (connections cut mid-shard) records its state after every sample and is killed
    with SIGKILL mid-shard; a fresh stream resumed from the last recorded state yields exactly what an uninterrupted
    stream yields after that sample."""
    log = tmp_path / "samples.jsonl"
    kwargs = dict(STREAM, repeat=True, retry_wait=0.01)
    with ShardServer(root, faults={"*": Fault(drop_after=7000, drop_times=3)}) as server:
        url = f"{server.url}/ds/train"
        child = multiprocessing.get_context("fork").Process(target=_stream_and_record, args=(url, str(log)))
        child.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and child.is_alive():
                if log.exists() and len(log.read_text().splitlines()) >= 6:
                    break
                time.sleep(0.02)
            assert child.is_alive(), "the streaming process ended before it was killed"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
        done = len(lines)
        assert done % PER_SHARD != 0  # killed mid-shard
        total = done + NUM_SHARDS * PER_SHARD
        expected = [_digest(s) for s in _take(iter(build_stream(url, **kwargs)), total)]
        resumed = build_stream(url, **kwargs)
        resumed.load_state_dict(lines[-1]["state"])
        tail = [_digest(s) for s in _take(iter(resumed), total - done)]
    assert [line["sample"] for line in lines] == expected[:done]
    assert tail == expected[done:]


def test_cache_dir_keeps_complete_copies_and_reads_them_offline(root: Path, local: list, tmp_path: Path):
    cache = tmp_path / "cache"
    with ShardServer(root, faults={"*": Fault(drop_after=6000, drop_times=1)}) as server:
        stream = build_stream(f"{server.url}/ds/train", cache_dir=cache, **STREAM, **FAST)
        cache.mkdir()
        stale = Path(cache_path(stream.access, stream.files[0]) + ".part-999999999-0badf00d")  # from a killed run
        stale.write_bytes(b"partial")
        assert _same(_samples(stream), local)
        assert not stale.exists()
        cached = sorted(cache.iterdir())
        assert len(cached) == NUM_SHARDS and not [p for p in cached if ".part" in p.name]
        by_size = sorted(p.stat().st_size for p in cached)
        assert by_size == sorted((root / n).stat().st_size for n in _shard_names(root))
        server.faults["*"] = Fault(hang=True)  # the server is gone: the next epoch reads the cache only
        requests = sum(server.requests.values())
        assert _same(_samples(stream), local)
        assert sum(server.requests.values()) == requests


def test_pretraining_data_over_http_gives_the_local_batches(tmp_path: Path):
    """What the training script builds, with its shard arguments as URLs: the same batches as from local files."""
    demo = write_demo_pretraining_shards(
        tmp_path / "demo", num_videos=4, num_images=8, num_shards=2, size=32, num_frames=8
    )
    config = PretrainingDataConfig(
        image_batch_size=4,
        video_batch_size=2,
        image_size=32,
        num_frames=4,
        frame_interval=2,
        scale_range=(32, 40),
        min_mask_patches=2,
        shuffle_buffer=4,
        num_workers=0,
    )
    settings = {"seed": 3}
    local = PretrainingData(config, demo.image_shards, demo.video_shards, **settings)
    expected = [local.next_batch() for _ in range(3)]
    local.close()
    with ShardServer(tmp_path, faults={"*": Fault(drop_after=3000, drop_times=1)}) as server:

        def urls(paths: list[str]) -> list[str]:
            return [f"{server.url}/{Path(p).relative_to(tmp_path).as_posix()}" for p in paths]

        options = {"retry_wait": 0.01, "timeout": 5.0, "cache_dir": str(tmp_path / "cache")}
        remote = PretrainingData(
            config, urls(demo.image_shards), urls(demo.video_shards), **settings, stream_options=options
        )
        got = [remote.next_batch() for _ in range(3)]
        remote.close()
    for a, b in zip(got, expected, strict=True):
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------------ fsspec


def test_memory_filesystem_write_list_read(root: Path, local: list):
    """The generic fsspec path: write_shards into memory:// (upload per finished shard), list, read metadata, stream."""
    base = "memory://bevt-tests/ds/train"
    samples = list(iter_shard(root / _shard_names(root)[0])) + list(iter_shard(root / _shard_names(root)[1]))
    samples += list(iter_shard(root / _shard_names(root)[2]))
    written = write_shards(
        [(k, e, d, m) for k, e, d, m in samples], base, num_shards=NUM_SHARDS, kind="video", labels=LABELS
    )
    assert written == [f"{base}/shard-{i:05d}.tar" for i in range(NUM_SHARDS)]
    assert list_shards(f"{base}/*.tar") == written == list_shards(base)
    assert list_shards(f"{base}/shard-{{00001..00002}}.tar") == written[1:]
    assert load_dataset_info(written[0])["num_samples"] == NUM_SHARDS * PER_SHARD
    assert read_labels(base) == LABELS == read_labels(f"{base}/labels.txt")
    assert check_label_consistency(base, label_names=f"{base}/labels.txt") == dict(enumerate(LABELS))
    mismatch = "class 'jump' is label 0 in memory://bevt-tests/ds/train/dataset_info.json but label 1"
    with pytest.raises(LabelMismatchError, match=mismatch):
        check_label_consistency(base, label_names=["run", "jump", "swim"], scan_samples=False)
    assert _same(_samples(build_stream(base, **STREAM)), local)
    assert _same(_samples(build_stream(Path(base), **STREAM)), local)  # a Path that collapsed the "//"
    fsspec.filesystem("memory").rm("/bevt-tests", recursive=True)


class _FlakyFile(MemoryFile):
    """A memory file whose first read past the middle of the file raises a connection error (once per open)."""

    def read(self, n: int = -1) -> bytes:
        if not self.failed and self.tell() + (n if n >= 0 else len(self.getvalue())) > len(self.getvalue()) // 2:
            self.failed = True
            FlakyFileSystem.failures += 1
            raise ConnectionResetError("connection reset by peer (injected)")
        return super().read(n)


class FlakyFileSystem(MemoryFileSystem):
    """``flaky://``: memory:// whose files drop the connection mid-file on the first open of each path."""

    protocol = ("flaky",)
    failures = 0
    opened: set[str] = set()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol("memory://" + path[len("flaky://") :] if path.startswith("flaky://") else path)

    def unstrip_protocol(self, name: str) -> str:
        return "flaky://" + name.lstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if mode != "rb" or path in self.opened or not path.endswith(".tar"):
            return f
        self.opened.add(path)
        flaky = _FlakyFile(self, path, f.getvalue())
        flaky.failed = False
        return flaky


def test_generic_fsspec_filesystem_errors_are_retried_at_the_byte(root: Path, local: list):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    memory = fsspec.filesystem("memory")
    for name in _shard_names(root) + ["ds/train/dataset_info.json"]:
        memory.pipe(f"/bevt-flaky/{name}", (root / name).read_bytes())
    try:
        stream = build_stream("flaky://bevt-flaky/ds/train", **STREAM, **FAST)
        assert _same(_samples(stream), local)
        assert FlakyFileSystem.failures == NUM_SHARDS
    finally:
        memory.rm("/bevt-flaky", recursive=True)


# ------------------------------------------------------------------------------------------ hf:// (offline)


@pytest.fixture()
def hub(root: Path, monkeypatch: pytest.MonkeyPatch):
    """`HfFileSystem` talks to `FakeHub` (a local stand-in for the Hub's listing and file endpoints), not the Hub."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with FakeHub(root / "ds", "org/k400") as server:
        yield server
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()


def test_hub_dataset_streams_through_hffilesystem(hub: FakeHub, local: list, tmp_path: Path):
    options = {"endpoint": hub.url, "token": False}
    expected = [f"hf://datasets/org/k400/train/shard-{i:05d}.tar" for i in range(NUM_SHARDS)]
    assert list_shards("hf://datasets/org/k400/train", storage_options=options) == expected
    assert list_shards("hf://datasets/org/k400/train/*.tar", storage_options=options) == expected
    pinned = list_shards("hf://datasets/org/k400@v1/train/shard-0000[12].tar", storage_options=options)
    assert pinned == [f"hf://datasets/org/k400@v1/train/shard-{i:05d}.tar" for i in (1, 2)]
    with pytest.raises(FileNotFoundError):
        list_shards("hf://datasets/org/k400@v9/train", storage_options=options)
    assert load_dataset_info("hf://datasets/org/k400/train", storage_options=options)["num_labels"] == 3
    assert read_labels("hf://datasets/org/k400/train/labels.txt", storage_options=options) == LABELS
    assert check_label_consistency(
        "hf://datasets/org/k400@v1/train", label_names=LABELS, storage_options=options
    ) == dict(enumerate(LABELS))
    stream = build_stream(
        "hf://datasets/org/k400@v1/train", storage_options=options, cache_dir=tmp_path / "cache", **STREAM
    )
    assert _same(_samples(stream), local)
    reads = hub.api_calls["resolve"]
    assert _same(_samples(stream), local)  # the second pass: from the cache, no file read from the Hub
    assert hub.api_calls["resolve"] == reads
    names, where = find_label_names("hf://datasets/org/k400/train/*.tar", storage_options=options)
    assert (names, where) == (LABELS, "hf://datasets/org/k400/train/labels.txt")
    loader = StreamDataLoader(  # DataLoader workers (forked) read their own shards through HfFileSystem
        build_stream("hf://datasets/org/k400/train", storage_options=options, **STREAM), batch_size=2, num_workers=2
    )
    assert sorted(k for batch in loader for k in batch["__key__"]) == sorted(x[0] for x in local)


def test_make_shards_writes_to_a_hub_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    videos = tmp_path / "videos"
    for i, cls in enumerate(["jump", "run", "run", "swim"]):
        (videos / cls).mkdir(parents=True, exist_ok=True)
        (videos / cls / f"c{i}.mp4").write_bytes(encode_video(8, seed=i))
    entries, names = make_shards_cli.scan_folder(videos)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("a dataset card")
    url = "hf://datasets/org/k400/train"
    with FakeHub(tmp_path / "repo", "org/k400") as hub:
        options = {"endpoint": hub.url, "token": "hf_fake"}
        info = make_shards_cli.make_shards(entries, videos, url, labels=names, num_shards=2, storage_options=options)
        assert info["num_samples"] == 4 and info["labels"] == ["jump", "run", "swim"]
        added = [c["added"] for c in hub.commits]  # one commit per finished shard, then the labels, then the info
        assert added == [
            ["train/shard-00000.tar"], ["train/shard-00001.tar"], ["train/labels.txt"], ["train/dataset_info.json"]
        ]
        with pytest.raises(ValueError, match="is not empty"):
            make_shards_cli.make_shards(entries, videos, url, labels=names, num_shards=2, storage_options=options)
        del hub.commits[:]
        make_shards_cli.make_shards(
            entries, videos, url, labels=names, num_shards=3, overwrite=True, storage_options=options
        )
        assert hub.commits[0]["deleted"] == [  # one commit removes the old set
            "train/dataset_info.json", "train/labels.txt", "train/shard-00000.tar", "train/shard-00001.tar"
        ]
        assert len(hub.commits) == 1 + 3 + 2
        shards = list_shards(url, storage_options=options)
        assert shards == [f"{url}/shard-{i:05d}.tar" for i in range(3)]
        keys = sorted(s["__key__"] for s in build_stream(url, clip_len=2, storage_options=options))
        assert keys == sorted(make_shards_cli.make_key(i, e.path) for i, e in enumerate(entries))
    assert (tmp_path / "repo" / "README.md").read_text() == "a dataset card"


def test_make_shards_refuses_a_missing_hub_repository(hub: FakeHub, root: Path):
    entries = [make_shards_cli.Entry("x.mp4", 0, "jump")]
    with pytest.raises(ValueError, match="the Hub repository .* does not exist.*create it first"):
        make_shards_cli.make_shards(
            entries, root, "hf://datasets/org/missing/train", storage_options={"endpoint": hub.url, "token": False}
        )


# ------------------------------------------------------------------------------------------ make_shards


def test_make_shards_writes_to_a_remote_folder(tmp_path: Path, capsys: pytest.CaptureFixture):
    videos = tmp_path / "videos"
    for i, cls in enumerate(["jump", "jump", "run", "run", "run"]):
        (videos / cls).mkdir(parents=True, exist_ok=True)
        (videos / cls / f"c{i}.mp4").write_bytes(encode_video(8, seed=i))
    (videos / "run" / "broken.mp4").write_bytes(encode_video(8, seed=9)[:300])  # fails --verify: late skip
    out = "memory://bevt-make/k400/train"
    memory = fsspec.filesystem("memory")
    try:
        args = ["--root", str(videos), "--output-dir", out, "--num-shards", "2", "--verify", "--num-workers", "1"]
        assert make_shards_cli.main(args) == 0
        assert "wrote 5 video samples in 2 shards" in capsys.readouterr().out
        info = load_dataset_info(out)
        assert [s["num_samples"] for s in info["shards"]] == [3, 2]  # rebalanced after the late skip
        assert info["skipped"] == {"undecodable": 1} and read_labels(out) == ["jump", "run"]
        keys = [key for shard in list_shards(out) for key, *_ in iter_shard(shard)]
        assert len(keys) == len(set(keys)) == 5
        assert sorted(memory.ls("/bevt-make/k400/train", detail=False)) == [
            f"/bevt-make/k400/train/{n}"
            for n in ("dataset_info.json", "labels.txt", "shard-00000.tar", "shard-00001.tar")
        ]

        assert make_shards_cli.main(args) == 2  # not empty
        assert "is not empty (2 shards, dataset_info.json, labels.txt)" in capsys.readouterr().err
        memory.pipe("/bevt-make/k400/train/README.md", b"keep me")
        assert make_shards_cli.main([*args[:5], "3", "--overwrite"]) == 0
        assert [s["num_samples"] for s in load_dataset_info(out)["shards"]] == [2, 2, 2]
        assert memory.cat("/bevt-make/k400/train/README.md") == b"keep me"
        memory.pipe("/bevt-make/k400/train/other-00000.tar", b"")
        assert make_shards_cli.main([*args, "--overwrite"]) == 2
        assert "holds .tar files that --overwrite does not replace (other-00000.tar" in capsys.readouterr().err

        assert make_shards_cli.main(["--root", str(videos), "--output-dir", "https://example.com/k400"]) == 2
        assert "cannot write to https://example.com/k400: HTTP has no standard upload" in capsys.readouterr().err
    finally:
        memory.rm("/bevt-make", recursive=True)


# ------------------------------------------------------------------------------------------ errors and helpers


def test_clear_errors_for_urls_that_cannot_work(root: Path):
    with pytest.raises(ValueError, match="unknown URL protocol 'nope'"):
        list_shards("nope://bucket/shards")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"s3:// URLs need the s3fs package \(pip install s3fs\)"):
            list_shards("s3://bucket/k400/train")
    (root / "bare").mkdir(exist_ok=True)
    (root / "bare" / "a.tar").write_bytes((root / _shard_names(root)[0]).read_bytes())
    with ShardServer(root) as server:
        with pytest.raises(FileNotFoundError, match="HTTP has no folder listing and there is no .*dataset_info.json"):
            list_shards(f"{server.url}/bare")
        assert list_shards(f"{server.url}/bare/a.tar") == [f"{server.url}/bare/a.tar"]
        with pytest.raises(FileNotFoundError, match="no shard files match"):
            list_shards(f"{server.url}/ds/train/val-*.tar")
    for bad, message in (
        (dict(max_retries=-1), "max_retries must be an int >= 0"),
        (dict(timeout=0), "timeout must be > 0"),
        (dict(retry_wait=-1), "retry_wait must be >= 0"),
        (dict(cache_dir="s3://bucket/cache"), "cache_dir must be a local folder"),
    ):
        with pytest.raises(ValueError, match=message):
            ShardAccess(**bad)
        with pytest.raises(ValueError, match=message):
            build_stream(root / "ds" / "train", **bad)


def test_find_label_names_next_to_shards(root: Path, tmp_path: Path):
    train = root / "ds" / "train"
    assert find_label_names(str(train / "*.tar")) == (LABELS, str(train / "labels.txt"))
    assert find_label_names([train / "shard-00001.tar"]) == (LABELS, str(train / "labels.txt"))
    (tmp_path / "x.tar").write_bytes(b"")
    assert find_label_names(tmp_path) == ([], None)
    with ShardServer(root) as server:
        assert find_label_names(f"{server.url}/ds/train") == (LABELS, f"{server.url}/ds/train/labels.txt")


def test_location_helpers():
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("a{0..1}/b{0..1}") == ["a0/b0", "a0/b1", "a1/b0", "a1/b1"]
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("s-{3..1}.tar")
    assert normalize(Path("hf://datasets/org/k400/train")) == "hf://datasets/org/k400/train"
    assert normalize("https:/host/x.tar") == "https://host/x.tar"
    assert normalize("file:///data/x.tar") == "/data/x.tar"
    assert normalize("relative/dir") == "relative/dir"


# ----------------------------------------------------------------------------------------------- training script


def _pretraining(out: Path, image_shards: str, video_shards: str, kill_at: str | None = None, resume: bool = False):
    """`run_pretraining.py` with the demo's settings given as flags (so the shards can be URLs), 6 steps (token
    targets of the random tokenizer: the recipe's target, which needs a tokenizer)."""
    from bevt.training.faults import KILL_AT_ENV

    command = [
        sys.executable, str(Path(__file__).resolve().parents[1] / "run_pretraining.py"),
        "--image_shards", image_shards, "--video_shards", video_shards, "--output_dir", str(out),
        "--model_preset", "test", "--image_size", "64", "--num_frames", "8", "--frame_interval", "2",
        "--scale_range", "64", "80", "--min_mask_patches", "2", "--video_batch_size", "2", "--image_batch_size", "4",
        "--shuffle_buffer", "16", "--num_workers", "0", "--learning_rate", "2e-3", "--max_train_steps", "6",
        "--checkpointing_steps", "2", "--logging_steps", "1", "--seed", "7", "--random_tokenizer",
        "--shard_cache_dir", str(out / "cache"), "--shard_timeout", "10",
    ]  # fmt: skip
    if resume:
        command += ["--resume_from_checkpoint", "latest"]
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV} | {"OMP_NUM_THREADS": "1"}
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pretraining_over_http_killed_mid_run_resumes_to_the_weights_of_a_local_run(
    tmp_path: Path, pretraining_demo_data: Path
):
    """kill -9 of `run_pretraining.py` reading its shards over HTTP (one connection cut mid-shard), then
    `--resume_from_checkpoint latest`: the same final weights as an uninterrupted run on the same shards as local
    files."""
    local = _pretraining(tmp_path / "local", str(pretraining_demo_data / "images"), str(pretraining_demo_data / "videos"))
    assert local.returncode == 0, local.stderr[-4000:]
    with ShardServer(pretraining_demo_data, faults={"*": Fault(drop_after=40_000, drop_times=1)}) as server:
        urls = (f"{server.url}/images", f"{server.url}/videos")
        out = tmp_path / "http"
        killed = _pretraining(out, *urls, kill_at="step:3")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        resumed = _pretraining(out, *urls, resume=True)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert server.range_requests > 0  # the cut connection was resumed at the byte
    assert "checkpoint-2 at step 2" in resumed.stderr  # killed after step 3: the newest checkpoint was step 2
    reference, weights = load_file(tmp_path / "local" / "model.safetensors"), load_file(out / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_each_rank_and_worker_reads_only_its_own_shards_once(root: Path):
    """Issue 19: each rank (and each DataLoader worker) opens only its own shards, and streams each one once, front to
    back: the server sees requests for that shard only, and exactly its bytes (nothing downloaded ahead, no other
    shard touched)."""
    names = _shard_names(root)
    sizes = {name: (root / name).stat().st_size for name in names}
    seen: dict[str, int] = {}
    with ShardServer(root) as server:
        for rank in range(NUM_SHARDS):  # one shard per rank
            server.reset_counters()
            stream = build_stream(f"{server.url}/ds/train", **STREAM, **FAST, rank=rank, world_size=NUM_SHARDS)
            keys = sorted(s[0] for s in _samples(stream))
            read = [name for name in names if server.requests[name]]
            assert len(read) == 1 and server.bytes_sent[read[0]] == sizes[read[0]], (rank, dict(server.requests))
            first = int(read[0][-9:-4]) * PER_SHARD  # shard-0000k.tar holds v(4k) .. v(4k+3)
            assert keys == [f"v{i:02d}" for i in range(first, first + PER_SHARD)]
            seen[read[0]] = rank
        assert sorted(seen) == names  # every shard read by exactly one rank

        server.reset_counters()  # one rank, three workers: one shard each, each shard's bytes sent once
        stream = build_stream(f"{server.url}/ds/train", **STREAM, **FAST)
        loader = StreamDataLoader(stream, batch_size=2, num_workers=3)
        keys = sorted(k for batch in loader for k in batch["__key__"])
        assert keys == [f"v{i:02d}" for i in range(NUM_SHARDS * PER_SHARD)]
        assert {name: server.bytes_sent[name] for name in names} == sizes
        assert all(server.requests[name] == 1 for name in names), dict(server.requests)
