"""Local HTTP servers on 127.0.0.1 for the remote-shard tests and the data benchmark (imported as `shard_server`).

* :class:`ShardServer` serves a folder over HTTP, with range requests (or without), and faults injected per file:
  answer an error status the first N times, cut the connection in the middle of the first N responses, send slowly,
  or never answer at all.
* :class:`FakeHub` is a stand-in for the Hugging Face Hub endpoints that ``huggingface_hub.HfFileSystem`` calls to
  list, read and write a dataset repository (``/api/datasets/{repo}/revision/{rev}``, ``.../tree/{rev}/{path}``,
  ``.../paths-info/{rev}``, ``/datasets/{repo}/resolve/{rev}/{path}``; ``.../preupload/{rev}`` and
  ``.../commit/{rev}`` with every file "regular", i.e. inline in the commit), serving one repository from a local
  folder. It answers only what those calls need; it is not a Hub.

Both run in a daemon thread, stop on ``stop()`` / leaving the ``with`` block, and stop by themselves after
``max_seconds`` (a watchdog), so a test that fails half-way never leaves a server behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_CHUNK = 16 << 10


@dataclass
class Fault:
    """What goes wrong with one file.

    * ``stall`` / ``stall_times``: the first requests get no answer for ``stall`` seconds, then the connection closes
      (the client times out first);
    * ``status`` / ``status_times``: the first requests are answered with that status (503: a busy server);
    * ``drop_after`` / ``drop_times``: the first responses are cut when they reach that byte of the file (the
      socket is shut down; a range response starting past it is cut before its first byte);
    * ``hang``: never answer; ``delay``: seconds of sleep before each 16 KiB chunk (a slow server).
    """

    stall: float = 0.0
    stall_times: int = 0
    status: int = 503
    status_times: int = 0
    drop_after: int | None = None
    drop_times: int = 0
    hang: bool = False
    delay: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ShardServer:
    """Serve ``root`` on ``http://127.0.0.1:<port>/``; ``faults`` maps a file path relative to ``root`` (or ``"*"``,
    every file) to a :class:`Fault`. ``ranges=False`` ignores ``Range`` headers (always the whole file, 200).

    Counters (for assertions): ``requests[path]``, ``range_requests``, ``bytes_sent[path]``, ``statuses``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        ranges: bool = True,
        faults: dict[str, Fault] | None = None,
        max_seconds: float = 120.0,
    ) -> None:
        self.root = Path(root)
        self.ranges = ranges
        self.faults = dict(faults or {})
        self.max_seconds = max_seconds
        self.requests: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.range_requests = 0
        self._responses: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> ShardServer:
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.max_seconds, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> ShardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent.clear()
            self.statuses.clear()
            self._responses.clear()
            self.range_requests = 0

    # ------------------------------------------------------------------------------ serving

    def resolve(self, handler: BaseHTTPRequestHandler) -> tuple[str, Path] | None:
        """The (name, file) a GET/HEAD asks for, or ``None`` (404). Subclasses map other URL layouts."""
        name = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path).lstrip("/")
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            return None
        return name, path

    def fault(self, name: str) -> Fault:
        return self.faults.get(name) or self.faults.get("*") or Fault()

    def serve_file(self, handler: BaseHTTPRequestHandler, name: str, path: Path, head: bool = False) -> None:
        with self._lock:
            n = self.requests[name]
            self.requests[name] += 1
        fault = self.fault(name)
        if fault.hang:
            self._stop.wait(self.max_seconds)  # never answers; returns when the server stops
            return
        if n < fault.stall_times:
            self._stop.wait(fault.stall)  # no answer in time: the client times out; then close without one
            handler.close_connection = True
            return
        if n < fault.status_times:
            self._count_status(fault.status)
            handler.send_error(fault.status)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        status = 200
        header = handler.headers.get("Range")
        if self.ranges and header:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
            if m is None or int(m.group(1)) >= len(data):
                self._count_status(416)
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
            status = 206
            with self._lock:
                self.range_requests += 1
        self._count_status(status)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/x-tar")
        handler.send_header("Content-Length", str(end - start))
        handler.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        if self.ranges:
            handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        handler.end_headers()
        if head:
            return
        with self._lock:
            drop = fault.drop_after is not None and self._responses[name] < fault.drop_times
            self._responses[name] += 1
        sent = 0
        body = memoryview(data)[start:end]
        cut = max(fault.drop_after - start, 0) if drop else None  # body bytes before the cut
        while sent < len(body):
            if self._stop.is_set():
                return
            if fault.delay:
                time.sleep(fault.delay)
            piece = body[sent : sent + _CHUNK]
            if cut is not None and sent + len(piece) > cut:
                piece = piece[: max(cut - sent, 0)]
                handler.wfile.write(piece)
                handler.wfile.flush()
                self._add_bytes(name, len(piece))
                handler.close_connection = True
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            try:
                handler.wfile.write(piece)
            except (BrokenPipeError, ConnectionResetError):
                return
            self._add_bytes(name, len(piece))
            sent += len(piece)

    def _count_status(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1

    def _add_bytes(self, name: str, n: int) -> None:
        with self._lock:
            self.bytes_sent[name] += n

    def handle_other(self, handler: BaseHTTPRequestHandler, method: str) -> bool:
        """Requests other than a file (subclasses: API endpoints); ``True`` when answered."""
        return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _answer(self, method: str) -> None:
                if server.handle_other(self, method):
                    return
                found = server.resolve(self)
                if found is None:
                    server._count_status(404)
                    self.send_error(404)
                    return
                server.serve_file(self, *found, head=method == "HEAD")

            def do_GET(self) -> None:
                self._answer("GET")

            def do_HEAD(self) -> None:
                self._answer("HEAD")

            def do_POST(self) -> None:
                if not server.handle_other(self, "POST"):
                    self.send_error(404)

        return Handler


class FakeHub(ShardServer):
    """The Hub endpoints ``HfFileSystem`` uses to list and read ``datasets/<repo_id>`` (served from ``root``), at
    revisions ``main``, ``revisions`` (tags) and the fake commit sha. Point ``HfFileSystem(endpoint=hub.url)`` at it.
    ``api_calls`` counts the API endpoints called."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root: str | Path, repo_id: str, *, revisions: tuple[str, ...] = ("v1",), **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.repo_id = repo_id
        self.revisions = {"main", self.SHA, *revisions}
        self.api_calls: Counter[str] = Counter()
        self.commits: list[dict[str, Any]] = []  # {"summary", "added": [paths], "deleted": [paths]}

    def _json(self, handler: BaseHTTPRequestHandler, payload: Any, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _entry(self, path: Path) -> dict[str, Any]:
        rel = path.relative_to(self.root).as_posix()
        if path.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "path": rel}
        data = path.read_bytes()
        return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": rel}

    def _check(self, handler: BaseHTTPRequestHandler, repo: str, revision: str) -> bool:
        if repo != self.repo_id:
            self._error(handler, 404, "RepoNotFound", f"Repository {repo} not found")
            return False
        if urllib.parse.unquote(revision) not in self.revisions:
            self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return False
        return True

    def handle_other(self, handler: BaseHTTPRequestHandler, method: str) -> bool:
        split = urllib.parse.urlsplit(handler.path)
        path = urllib.parse.unquote(split.path)
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/(.+)", path)
        if m and method == "GET":
            self.api_calls["revision"] += 1
            if self._check(handler, m.group(1), m.group(2)):
                self._json(handler, {"id": self.repo_id, "sha": self.SHA, "private": False, "siblings": []})
            return True
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/tree/([^/]+)(/.*)?)?", path)
        if m and method == "GET" and m.group(2) is None:
            self.api_calls["info"] += 1
            if self._check(handler, m.group(1), "main"):
                self._json(handler, {"id": self.repo_id, "sha": self.SHA, "private": False, "siblings": []})
            return True
        if m and method == "GET":
            self.api_calls["tree"] += 1
            if not self._check(handler, m.group(1), m.group(2)):
                return True
            folder = (self.root / (m.group(3) or "/").lstrip("/")).resolve()
            if not folder.is_dir():
                self._error(handler, 404, "EntryNotFound", f"{m.group(3)} does not exist")
                return True
            recursive = "recursive=true" in split.query.lower() or "recursive=1" in split.query
            items = folder.rglob("*") if recursive else folder.iterdir()
            self._json(handler, [self._entry(p) for p in sorted(items)])
            return True
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if m and method == "POST":
            self.api_calls[m.group(2)] += 1
            raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
            if not self._check(handler, m.group(1), m.group(3)):
                return True
            if m.group(2) == "preupload":
                files = json.loads(raw)["files"]
                self._json(handler, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
                return True
            commit: dict[str, Any] = {"added": [], "deleted": []}
            for line in raw.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    commit["summary"] = value.get("summary")
                elif item["key"] == "file":
                    target = self.root / value["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                    commit["added"].append(value["path"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    target = self.root / value["path"]
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                    commit["deleted"].append(value["path"])
                else:
                    self._error(handler, 400, "BadRequest", f"unsupported commit operation {item['key']}")
                    return True
            self.commits.append(commit)
            url = f"{self.url}/datasets/{self.repo_id}/commit/{self.SHA}"
            self._json(handler, {"commitUrl": url, "commitOid": self.SHA, "pullRequestUrl": None})
            return True
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
        if m and method == "POST":
            self.api_calls["paths-info"] += 1
            length = int(handler.headers.get("Content-Length") or 0)
            raw = handler.rfile.read(length).decode()
            if "json" in (handler.headers.get("Content-Type") or ""):
                paths = json.loads(raw).get("paths", [])
            else:
                paths = urllib.parse.parse_qs(raw).get("paths", [])
            if self._check(handler, m.group(1), m.group(2)):
                found = [self.root / p for p in paths if (self.root / p).exists()]
                self._json(handler, [self._entry(p) for p in found])
            return True
        return False

    def resolve(self, handler: BaseHTTPRequestHandler) -> tuple[str, Path] | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None or m.group(1) != self.repo_id or urllib.parse.unquote(m.group(2)) not in self.revisions:
            return None
        file = (self.root / m.group(3)).resolve()
        if self.root.resolve() not in file.parents or not file.is_file():
            return None
        self.api_calls["resolve"] += 1
        return m.group(3), file
