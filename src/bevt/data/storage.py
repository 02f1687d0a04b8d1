"""Where shards live: local paths and URLs, read with retries, written atomically.

Every shard argument of the library (:func:`bevt.data.shards.list_shards`, :func:`bevt.data.streaming.build_stream`,
``load_dataset_info``, ``read_labels``, ``check_label_consistency``, ``ShardWriter`` / ``make_shards --output-dir``)
takes a local path or one of these URLs:

* ``hf://datasets/<org>/<name>[@<revision>]/<path>``: a Hub dataset repository, through
  ``huggingface_hub.HfFileSystem`` (your token: ``HF_TOKEN`` or ``hf auth login``, or
  ``storage_options={"token": ...}``; a revision with a slash is written URL-encoded, ``@refs%2Fpr%2F1``);
* ``http://`` / ``https://``: any web server (read with the standard library; ``storage_options={"headers": {...}}``
  adds request headers, e.g. ``Authorization``). HTTP cannot list folders: a folder or glob URL is resolved from
  the ``dataset_info.json`` next to the shards (``make_shards`` writes it), or pass the shard URLs, with
  ``{00000..00099}`` ranges;
* any other fsspec protocol whose package is installed: ``s3://`` (``s3fs``), ``gs://`` (``gcsfs``), ``az://`` /
  ``abfs://`` (``adlfs``), ``memory://``, ...; ``storage_options`` go to the filesystem (``endpoint_url``,
  ``anon``, credentials). A missing package is an ``ImportError`` naming it.

Reading (:func:`open_shard`) is streamed: a shard is read front to back through one connection (no download before
training; memory per open shard is bounded by a few MiB of look-back, see :class:`RemoteFile`). A dropped connection,
a 5xx / 408 / 429 answer or a timeout is retried with exponential backoff and the read resumes at the exact byte where
it stopped: with a range request where the server honours them, otherwise by restarting the shard and skipping the
bytes already read (checked to be the same file: size and ``ETag`` / ``Last-Modified``). After
``ShardAccess.max_retries`` failed tries without progress the read raises :class:`ShardUnavailableError`, which the
stream counts as a ``shard_unavailable`` sample (the rest of that shard is lost, the run goes on). A missing file
(404) or a refused one (401 / 403) is not retried.

An optional cache (``ShardAccess.cache_dir``) keeps a full copy of each shard read completely (written next to the
read, renamed into place when complete; keyed by URL, so clear it if shards are rewritten at the same URL); a cached
shard is read from the local copy without touching the network.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

__all__ = [
    "RemoteFile",
    "RemoteFolder",
    "ShardAccess",
    "ShardChangedError",
    "ShardUnavailableError",
    "expand_braces",
    "is_url",
    "join",
    "list_remote",
    "normalize",
    "open_shard",
    "parent",
    "read_bytes",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MANGLED_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")  # what pathlib.Path makes of "hf://..."
_BRACES_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_HTTP = ("http", "https")
# Filesystems where an object appears only once its upload completed: uploads go straight to the final name.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf", "memory", "oss", "oci"}
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
_RETRY_STATUS = (408, 425, 429)
_CHUNK = 1 << 20  # bytes asked of a connection per read
_WINDOW = 4 << 20  # bytes kept behind the read position (the tar reader seeks back by up to ~1 MiB)
_TAIL = 64 << 10  # a cached shard's unread tail (tar padding) that close() still fetches


class ShardUnavailableError(OSError):
    """A remote file could not be read after every retry (connection errors, 5xx answers, timeouts)."""


class ShardChangedError(OSError):
    """A remote file changed (size or ETag) between two connections of the same read."""


class _UnusableResponseError(OSError):
    """An answer retrying will not change (e.g. no size for the file)."""


class _HTTPStatusError(OSError):
    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason} for {url}")
        self.status = status


@dataclass
class ShardAccess:
    """How remote shards are reached: filesystem options, retries, timeout and the optional local cache.

    Args:
        storage_options: keyword arguments of the URL's fsspec filesystem (``token`` / ``endpoint`` for ``hf://``,
            ``endpoint_url`` / ``anon`` / ``key`` for ``s3://``, ...); for ``http(s)://``, ``headers``.
        cache_dir: keep a local copy of every shard read completely there, and read it from there afterwards.
        max_retries: tries after the first one, at one position, before the file counts as unavailable (a try
            that makes progress resets the count).
        retry_wait: seconds before the first retry; doubling with every retry (with jitter), at most
            ``max_retry_wait``.
        timeout: seconds an ``http(s)://`` connection may wait for data before the read is retried (other
            protocols use their own library's timeouts, set through ``storage_options``).
    """

    storage_options: Mapping[str, Any] | None = None
    cache_dir: str | None = None
    max_retries: int = 5
    retry_wait: float = 1.0
    max_retry_wait: float = 30.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict, got {type(self.storage_options).__name__}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        for name in ("retry_wait", "max_retry_wait"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        if self.cache_dir is not None:
            self.cache_dir = os.fspath(self.cache_dir)
            if is_url(self.cache_dir):
                raise ValueError(f"cache_dir must be a local folder, got the URL {self.cache_dir}")

    def wait(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        base = min(self.retry_wait * 2 ** (attempt - 1), self.max_retry_wait)
        return base * _JITTER.uniform(0.5, 1.0)

    def retry(self, what: str, fn: Callable[[], T], on_error: Callable[[], None] | None = None) -> T:
        """``fn()``, retried while it fails transiently (see :func:`is_transient`); ``what`` names it in messages.

        Raises:
            ShardUnavailableError: still failing after ``max_retries`` retries.
            The error itself when it is not transient (a missing file, a refused request).
        """
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as err:
                if on_error is not None:
                    on_error()
                if not is_transient(err):
                    raise
                attempt += 1
                if attempt > self.max_retries:
                    raise ShardUnavailableError(
                        f"{what}: gave up after {attempt} tries ({type(err).__name__}: {err})"
                    ) from err
                wait = self.wait(attempt)
                logger.warning(
                    "%s failed (%s: %s); retry %d of %d in %.2f s",
                    what,
                    type(err).__name__,
                    err,
                    attempt,
                    self.max_retries,
                    wait,
                )
                time.sleep(wait)


_JITTER = random.Random()  # backoff jitter only: never the global RNG, which user code may have seeded


def _status_of(err: BaseException) -> int | None:
    """The HTTP status an exception carries (urllib, aiohttp, httpx/requests, botocore), if any."""
    for value in (getattr(err, "status", None), getattr(err, "code", None)):
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    if isinstance(code, int):
        return code
    if isinstance(response, Mapping):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    return None


_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ShardChangedError,
    ShardUnavailableError,
    _UnusableResponseError,
    ImportError,
    ValueError,
    TypeError,
    NotImplementedError,
)


def is_transient(err: BaseException) -> bool:
    """Whether retrying may help: connection errors, timeouts, 5xx / 408 / 425 / 429 answers (not a missing file,
    a refused request, another 4xx, a bad argument)."""
    status = _status_of(err)
    if status is not None:
        return status in _RETRY_STATUS or status >= 500
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, ssl.SSLCertVerificationError):
        return False
    return not isinstance(err, _PERMANENT)


# ------------------------------------------------------------------------------------------ locations


def normalize(location: str | os.PathLike) -> str:
    """``location`` as a string: a URL as given (one that ``pathlib.Path`` collapsed, ``hf:/datasets/...``, is
    repaired), ``file://`` URLs as local paths."""
    s = os.fspath(location)
    m = _MANGLED_RE.match(s)
    if m and _known_protocol(m.group(1)) and not os.path.exists(s):
        s = f"{m.group(1)}://{s[m.end():]}"
    if s.startswith("file://"):
        s = s[len("file://") :]
    return s


def protocol(location: str) -> str | None:
    """The URL protocol (``"hf"``, ``"https"``, ``"s3"``...), ``None`` for a local path."""
    m = _URL_RE.match(location)
    return m.group(1).lower() if m else None


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL (not a local path or a ``file://`` URL)."""
    p = protocol(normalize(location))
    return p is not None and p != "file"


def _known_protocol(name: str) -> bool:
    if name.lower() in _HTTP:
        return True
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:  # pragma: no cover - fsspec comes with datasets
        return False
    return name.lower() in known_implementations or name.lower() in registry


def _split_query(url: str) -> tuple[str, str]:
    base, sep, query = url.partition("?")
    return base, sep + query


def parent(location: str) -> str | None:
    """The folder of a file location (``None`` for a URL with a query string, e.g. a presigned URL)."""
    if is_url(location):
        if "?" in location:
            return None
        return posixpath.dirname(location.rstrip("/"))
    return os.path.dirname(location)


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a folder URL."""
    if is_url(folder):
        return f"{folder.rstrip('/')}/{name}"
    return os.path.join(folder, name)


def basename(location: str) -> str:
    """The file name of a path or URL (without a URL's query string)."""
    return posixpath.basename(_split_query(location)[0].rstrip("/")) if is_url(location) else os.path.basename(location)


def expand_braces(location: str) -> list[str]:
    """Expand WebDataset-style numeric ranges: ``"s-{000..002}.tar"`` -> ``s-000.tar, s-001.tar, s-002.tar``
    (zero-padded to the width of the first bound; several ranges expand as nested loops)."""
    m = _BRACES_RE.search(location)
    if m is None:
        return [location]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"empty range {{{lo}..{hi}}} in {location!r}")
    width = len(lo)
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(f"{location[: m.start()]}{i:0{width}d}{location[m.end():]}"))
    return out


def _filesystem(url: str, access: ShardAccess) -> tuple[Any, str]:
    """The fsspec filesystem and path of a (non-HTTP) URL, with a clear error for a missing package."""
    import fsspec.core

    proto = protocol(url) or "file"
    try:
        return fsspec.core.url_to_fs(url, **dict(access.storage_options or {}))
    except ImportError as err:
        package = _PACKAGES.get(proto)
        if package is None:
            from fsspec.registry import known_implementations

            package = known_implementations.get(proto, {}).get("class", "?").split(".")[0]
        raise ImportError(
            f"{url}: {proto}:// URLs need the {package} package (pip install {package}): {err}"
        ) from err
    except ValueError:
        if not _known_protocol(proto):
            raise ValueError(
                f"{url}: unknown URL protocol {proto!r} (no fsspec filesystem for it); use a local path, hf://, "
                "http(s)://, or a protocol whose fsspec package is installed (s3://, gs://, az://, ...)"
            ) from None
        raise


def _to_url(fs: Any, path: str, proto: str, folder_url: str) -> str:
    """The URL of a listed ``path``, spelled like ``folder_url`` (the user's URL of its folder) where possible."""
    folder = fs._strip_protocol(folder_url).rstrip("/")
    if path.startswith(folder + "/"):
        return folder_url.rstrip("/") + path[len(folder) :]
    url = fs.unstrip_protocol(path)
    if not url.startswith(f"{proto}://"):
        url = f"{proto}://{url.split('://', 1)[-1]}"
    return url


def list_remote(url: str, access: ShardAccess | None = None) -> list[str]:
    """The files a URL stands for: a file (as is, not checked: a missing shard is reported when it is read), a
    folder (its ``*.tar``), or a glob; folders and globs come sorted.

    HTTP(S) folders and globs are resolved from the folder's ``dataset_info.json`` (HTTP cannot list).

    Raises:
        FileNotFoundError: nothing matches, the folder does not exist, or an HTTP folder has no ``dataset_info.json``.
    """
    access = access or ShardAccess()
    proto = protocol(url) or "file"
    base, query = _split_query(url) if proto in _HTTP else (url, "")
    name = posixpath.basename(base.rstrip("/"))
    wildcard = any(c in name for c in "*?[")
    if any(c in posixpath.dirname(base.split("://", 1)[1]) for c in "*?[") and proto in _HTTP:
        raise ValueError(f"{url}: only the file name of an http(s) URL may hold wildcards")
    if name.endswith(".tar") and not wildcard:
        return [url]
    if proto in _HTTP:
        if query:
            raise ValueError(f"{url}: a URL with a query string must name a .tar file")
        folder = posixpath.dirname(base) if wildcard else base.rstrip("/")
        pattern = name if wildcard else "*.tar"
        info_url = f"{folder}/dataset_info.json"
        try:
            info = json.loads(read_bytes(info_url, access))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"cannot list {url}: HTTP has no folder listing and there is no {info_url} (make_shards writes it "
                "next to the shards); pass the shard URLs instead (a list, or ranges like shard-{00000..00099}.tar)"
            ) from None
        names = sorted(s["file"] for s in info.get("shards", ()) if fnmatch.fnmatchcase(s["file"], pattern))
        if not names:
            raise FileNotFoundError(f"no shard files match {url!r} (the shards listed in {info_url})")
        return [f"{folder}/{n}" for n in names]
    fs, path = _filesystem(url, access)
    folder_url = posixpath.dirname(url) if wildcard else url
    if wildcard:
        found = sorted(access.retry(f"listing {url}", lambda: fs.glob(path)))
        if not found:
            raise FileNotFoundError(f"no shard files match {url!r}")
    elif access.retry(f"checking {url}", lambda: fs.isdir(path)):
        pattern = path.rstrip("/") + "/*.tar"
        found = sorted(access.retry(f"listing {url}", lambda: fs.glob(pattern)))
        if not found:
            raise FileNotFoundError(f"no .tar shards in folder {url}")
    elif access.retry(f"checking {url}", lambda: fs.exists(path)):
        return [url]  # a file (list_shards refuses it unless it is a .tar)
    else:
        raise FileNotFoundError(f"shard folder or file not found: {url}")
    return [_to_url(fs, p, proto, folder_url) for p in found]


def read_bytes(location: str, access: ShardAccess | None = None) -> bytes:
    """A whole (small) file: a local path or a URL, with retries.

    Raises:
        FileNotFoundError: it does not exist.
        ShardUnavailableError: still failing after the retries.
    """
    location = normalize(location)
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    access = access or ShardAccess()
    if protocol(location) in _HTTP:
        with RemoteFile(location, _HTTPSource(location, access), access) as f:
            return f.read()
    fs, path = _filesystem(location, access)
    return access.retry(f"reading {location}", lambda: fs.cat_file(path))


def open_shard(location: str | os.PathLike, access: ShardAccess | None = None) -> tuple[BinaryIO, int]:
    """Open a shard for reading: ``(seekable binary file, size in bytes)``. Local paths are opened directly; URLs
    through a :class:`RemoteFile` (or its copy in ``access.cache_dir``).

    Raises:
        OSError: cannot be opened (``FileNotFoundError``, ``ShardUnavailableError`` after the retries, ...).
    """
    location = normalize(location)
    if not is_url(location):
        f = open(location, "rb")  # noqa: SIM115 - the caller closes it
        return f, os.fstat(f.fileno()).st_size
    access = access or ShardAccess()
    target = None
    if access.cache_dir:
        target = cache_path(access, location)
        if os.path.isfile(target):
            f = open(target, "rb")  # noqa: SIM115
            return f, os.fstat(f.fileno()).st_size
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _remove_stale_parts(target)
    source: _Source = _HTTPSource(location, access) if protocol(location) in _HTTP else _FsspecSource(location, access)
    f = RemoteFile(location, source, access, cache_target=target)
    return f, f.size


def cache_path(access: ShardAccess, url: str) -> str:
    """Where ``access.cache_dir`` keeps the copy of ``url`` (one file per URL and endpoint)."""
    options = access.storage_options or {}
    endpoint = options.get("endpoint") or options.get("endpoint_url") or ""
    digest = hashlib.sha256(f"{url}\n{endpoint}".encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", basename(url))[-100:]
    return os.path.join(os.fspath(access.cache_dir), f"{digest}-{name}")


def _remove_stale_parts(target: str) -> None:
    """Delete partial cache copies of ``target`` left by processes that no longer run (killed mid-shard)."""
    folder, name = os.path.split(target)
    for entry in os.listdir(folder):
        m = re.fullmatch(re.escape(name) + r"\.part-(\d+)-[0-9a-f]+", entry)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, entry))
            except FileNotFoundError:
                pass
        except PermissionError:  # a live process of another user
            pass


# ------------------------------------------------------------------------------------------ reading


class _Source:
    """Opens connections to one remote file: ``open(start)`` -> ``(stream, first byte, size, validator)``, where
    ``stream.read(n)`` returns the next bytes (``b""`` at its end) and ``first byte`` is where the stream starts:
    ``start``, or 0 when the server ignores range requests."""

    def open(self, start: int) -> tuple[Any, int, int | None, str | None]:
        raise NotImplementedError


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib, but never sends ``Authorization`` / ``Cookie`` headers to another host (a CDN a
    private server redirects to must not see its credentials)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            for name in ("Authorization", "Cookie", "Proxy-Authorization"):
                new.remove_header(name)
        return new


_OPENER = urllib.request.build_opener(_RedirectHandler)


class _HTTPSource(_Source):
    """HTTP(S) through the standard library: one GET per connection, ``Range: bytes=start-`` from a position."""

    def __init__(self, url: str, access: ShardAccess) -> None:
        self.url = url
        self.timeout = access.timeout
        self.headers = {"Accept-Encoding": "identity", "User-Agent": "bevt"}
        self.headers.update(dict((access.storage_options or {}).get("headers") or {}))

    def open(self, start: int) -> tuple[Any, int, int | None, str | None]:
        headers = dict(self.headers)
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = _OPENER.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in (404, 410):
                raise FileNotFoundError(f"HTTP {err.code} {err.reason}: {self.url}") from None
            if err.code in (401, 403):
                raise PermissionError(f"HTTP {err.code} {err.reason}: {self.url}") from None
            raise _HTTPStatusError(self.url, err.code, str(err.reason)) from None
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if response.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != start:
                response.close()
                raise _HTTPStatusError(self.url, 502, f"unexpected Content-Range for bytes={start}-")
            size = int(m.group(3)) if m.group(3) != "*" else None
            return response, start, size, validator
        length = response.headers.get("Content-Length")
        return response, 0, int(length) if length is not None else None, validator


class _FsspecSource(_Source):
    """Any fsspec filesystem: a file object seeked to the position (its own block reads are range requests)."""

    def __init__(self, url: str, access: ShardAccess) -> None:
        self.url = url
        self.fs, self.path = _filesystem(url, access)

    def open(self, start: int) -> tuple[Any, int, int | None, str | None]:
        f = self.fs.open(self.path, "rb")
        try:
            size = int(f.size)
            if start:
                f.seek(start)
        except BaseException:
            f.close()
            raise
        return f, start, size, None


class RemoteFile:
    """A read-only, seekable binary file over a remote file, streamed through one connection at a time.

    Reads go front to back through a connection; the last ``4 MiB`` read stay in memory, so short backward seeks
    (the tar reader's) are served from there and a forward seek of up to 4 MiB reads on; a longer jump opens a
    new connection at the target byte. A failed read (see :func:`is_transient`) closes the connection and retries
    at the same byte, with backoff (``access``); :class:`ShardUnavailableError` after ``access.max_retries``
    retries without progress. With ``cache_target``, the bytes are also written to a temporary file, renamed to
    ``cache_target`` when the whole file went through (a partial read leaves nothing).

    Attributes: ``name`` (the URL), ``size``, ``ranges`` (whether the server honours range requests; ``None`` until
    a connection started past byte 0).
    """

    mode = "rb"

    def __init__(
        self, url: str, source: _Source, access: ShardAccess, cache_target: str | None = None
    ) -> None:
        self.name = url
        self.source = source
        self.access = access
        self.size: int = -1
        self.ranges: bool | None = None
        self.closed = False
        self._validator: str | None = None
        self._stream: Any = None
        self._stream_pos = 0  # the byte the open connection returns next
        self._window = bytearray()  # bytes [_window_start, _stream_pos)
        self._window_start = 0
        self._pos = 0
        self._tee: BinaryIO | None = None
        self._tee_pos = 0
        self._tee_tmp: str | None = None
        self._cache_target = cache_target
        self.access.retry(f"opening {url}", lambda: self._connect(0), on_error=self._disconnect)
        if cache_target is not None:
            self._tee_tmp = f"{cache_target}.part-{os.getpid()}-{_JITTER.getrandbits(32):08x}"
            self._tee = open(self._tee_tmp, "wb")  # noqa: SIM115 - closed in close()

    # ------------------------------------------------------------------------------ connections

    def _connect(self, start: int) -> None:
        """Open a connection whose next byte is ``start`` (skipping bytes when the server ignores the range)."""
        self._disconnect()
        stream, first, size, validator = self.source.open(start)
        self._stream = stream
        if self.size < 0:
            if size is None:
                raise _UnusableResponseError(f"{self.name}: the server sends no Content-Length (the size is unknown)")
            self.size, self._validator = size, validator
        elif (size is not None and size != self.size) or (
            validator and self._validator and validator != self._validator
        ):
            raise ShardChangedError(
                f"{self.name} changed while it was read (size {self.size} -> {size}, "
                f"validator {self._validator!r} -> {validator!r})"
            )
        if start > 0:
            self.ranges = first == start
        position = first
        while position < start:  # a server without range requests: restart, skip what was read already
            data = stream.read(min(_CHUNK, start - position))
            if not data:
                raise ConnectionError(f"the connection closed at byte {position} while skipping to byte {start}")
            position += len(data)
        self._stream_pos = start

    def _disconnect(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass
            self._stream = None

    def _pull(self, n: int) -> bytes:
        """The next ``<= n`` bytes of the connection (reconnecting at the same byte on failure)."""
        n = min(n, self.size - self._stream_pos)
        if n <= 0:
            return b""

        def once() -> bytes:
            if self._stream is None:
                self._connect(self._stream_pos)
            data = self._stream.read(n)
            if not data:
                raise ConnectionError(f"the connection closed at byte {self._stream_pos} of {self.size}")
            return data

        data = self.access.retry(
            f"reading {self.name} at byte {self._stream_pos}", once, on_error=self._disconnect
        )
        start = self._stream_pos
        self._stream_pos += len(data)
        self._window += data
        if len(self._window) > _WINDOW:
            drop = len(self._window) - _WINDOW
            del self._window[:drop]
            self._window_start += drop
        self._write_cache(start, data)
        return data

    def _move_to(self, position: int) -> None:
        """Make the connection's next byte ``position`` (read on, or reconnect there)."""
        if position == self._stream_pos:
            return
        ahead = position - self._stream_pos
        if self._stream is not None and 0 < ahead and (ahead <= _WINDOW or self.ranges is False):
            while self._stream_pos < position:
                self._pull(min(_CHUNK, position - self._stream_pos))
            return
        self._disconnect()  # the next _pull connects at `position`
        self._stream_pos = self._window_start = position
        self._window.clear()

    # ------------------------------------------------------------------------------ cache

    def _write_cache(self, start: int, data: bytes) -> None:
        if self._tee is None:
            return
        end = start + len(data)
        if start > self._tee_pos:  # a gap: the copy would be incomplete
            self._drop_cache()
        elif end > self._tee_pos:
            self._tee.write(data[self._tee_pos - start :])
            self._tee_pos = end

    def _drop_cache(self) -> None:
        if self._tee is not None:
            self._tee.close()
            self._tee = None
            if self._tee_tmp and os.path.exists(self._tee_tmp):
                os.unlink(self._tee_tmp)

    def _finish_cache(self) -> None:
        if self._tee is None:
            return
        try:
            if self._tee_pos < self.size and self.size - self._tee_pos <= _TAIL and self._tee_pos == self._stream_pos:
                while self._stream_pos < self.size:
                    self._pull(_CHUNK)
        except OSError:
            pass
        if self._tee_pos == self.size:
            self._tee.close()
            self._tee = None
            os.replace(self._tee_tmp, self._cache_target)
        else:
            self._drop_cache()

    # ------------------------------------------------------------------------------ file interface

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError(f"read from a closed file ({self.name})")
        remaining = max(self.size - self._pos, 0)
        n = remaining if n is None or n < 0 else min(n, remaining)
        parts: list[bytes] = []
        got = 0
        while got < n:
            p = self._pos
            if self._window_start <= p < self._stream_pos:
                offset = p - self._window_start
                piece = bytes(self._window[offset : offset + n - got])
            else:
                self._move_to(p)
                piece = self._pull(min(n - got, _CHUNK))
            parts.append(piece)
            got += len(piece)
            self._pos += len(piece)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            position = offset
        elif whence == 1:
            position = self._pos + offset
        elif whence == 2:
            position = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._pos = position
        return position

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._finish_cache()
        finally:
            self._disconnect()
            self._drop_cache()
            self.closed = True

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteFile({self.name!r}, size={self.size}, position={self._pos})"


# ------------------------------------------------------------------------------------------ writing


class RemoteFolder:
    """A folder URL to write to (``make_shards --output-dir``, :class:`bevt.data.shards.ShardWriter`).

    Files are written locally first and uploaded whole (:meth:`put`): object stores and the Hub (one commit per
    file) make an object visible only once it is complete; on other filesystems the upload goes to ``NAME.tmp``
    and is renamed. Every call is retried like reads.

    Raises:
        ValueError: an ``http(s)://`` URL (HTTP has no standard upload) or a Hub repository that does not exist.
    """

    def __init__(self, url: str, access: ShardAccess | None = None) -> None:
        url = normalize(url)
        proto = protocol(url)
        if proto is None or proto == "file":
            raise ValueError(f"not a URL: {url}")
        if proto in _HTTP:
            raise ValueError(
                f"cannot write to {url}: HTTP has no standard upload; write to a local folder, hf://datasets/..., "
                "s3://, gs:// or az:// (and serve that over HTTP if you like)"
            )
        self.url = url.rstrip("/")
        self.protocol = proto
        self.access = access or ShardAccess()
        self.fs, path = _filesystem(self.url, self.access)
        self.path = path.rstrip("/")
        if proto == "hf":
            try:
                self.fs.resolve_path(self.path)
            except FileNotFoundError as err:
                raise ValueError(
                    f"{url}: the Hub repository (or revision) does not exist ({err}); create it first, e.g. "
                    "`hf repos create <org>/<name> --repo-type dataset`"
                ) from None

    def _remote(self, name: str) -> str:
        return f"{self.path}/{name}"

    def names(self) -> list[str]:
        """Names of the entries in the folder (files and sub-folders), sorted; ``[]`` if it does not exist."""
        try:
            entries = self.access.retry(f"listing {self.url}", lambda: self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        return sorted(n for n in names if n)

    def put(self, local: str | os.PathLike, name: str) -> str:
        """Upload the local file ``local`` as ``name``; returns its URL."""
        target = self._remote(name)
        if self.protocol in _ATOMIC_PUT:
            self.access.retry(f"uploading {name} to {self.url}", lambda: self.fs.put_file(os.fspath(local), target))
        else:
            tmp = target + ".tmp"
            self.access.retry(f"uploading {name} to {self.url}", lambda: self.fs.put_file(os.fspath(local), tmp))
            self.access.retry(f"renaming {tmp}", lambda: self.fs.mv(tmp, target))
        return f"{self.url}/{name}"

    def remove(self, names: list[str]) -> None:
        """Delete these files of the folder (one call; one commit on the Hub)."""
        if not names:
            return
        what = f"removing {len(names)} files from {self.url}"
        if self.protocol != "hf":
            paths = [self._remote(n) for n in names]
            self.access.retry(what, lambda: self.fs.rm(paths))
            return
        from huggingface_hub import CommitOperationDelete, HfApi

        resolved = self.fs.resolve_path(self.path)
        folder = resolved.path_in_repo.strip("/")
        operations = [CommitOperationDelete(path_in_repo=f"{folder}/{n}" if folder else n) for n in names]
        api = HfApi(endpoint=self.fs.endpoint, token=self.fs.token)
        self.access.retry(
            what,
            lambda: api.create_commit(
                resolved.repo_id,
                operations,
                commit_message=f"Remove {len(names)} files of {folder or 'the repository root'} (bevt make_shards)",
                repo_type=resolved.repo_type,
                revision=resolved.revision,
            ),
        )
        self.fs.invalidate_cache(self.path)

    def read_bytes(self, name: str) -> bytes:
        return self.access.retry(f"reading {name} from {self.url}", lambda: self.fs.cat_file(self._remote(name)))
