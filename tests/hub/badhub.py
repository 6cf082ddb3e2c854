"""A misbehaving hub over loopback HTTP: serves a folder (with Range support) like a static file
server, except that chosen files are answered badly: trickled a byte at a time, with their
headers trickled, with HTTP 500 some number of times, cut mid-file some number of times."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Misbehaviour:
    """What to do to requests for paths ending with a suffix."""

    errors: int = 0
    """Answer this many requests with ``status`` first."""
    status: int = 500
    cuts: int = 0
    """Then cut this many responses halfway (after their full headers)."""
    trickle: bool = False
    """Then send the body one byte every ``interval_s`` (forever, while the client reads)."""
    trickle_headers: bool = False
    """Send the status line and headers one byte every ``interval_s``."""
    interval_s: float = 0.05


class BadHub:
    """Serve ``root`` on 127.0.0.1 in a thread; :meth:`close` stops it (and every trickle)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rules: dict[str, Misbehaviour] = {}
        self.requests: list[tuple[str, str]] = []
        """(path, Range header) of every request, in order."""
        self.lock = threading.Lock()
        self.closing = threading.Event()
        handler = partial(_Handler, self, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bad-hub")
        self._thread.start()

    def rule(self, path: str) -> Misbehaviour | None:
        with self.lock:
            for suffix, rule in self.rules.items():
                if path.endswith(suffix):
                    return rule
        return None

    def count(self, suffix: str) -> int:
        with self.lock:
            return sum(1 for path, _ in self.requests if path.endswith(suffix))

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, hub: BadHub, *args: Any, **kwargs: Any) -> None:
        self.hub = hub
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _slowly(self, data: bytes, interval_s: float) -> None:
        for i in range(len(data)):
            if self.hub.closing.is_set():
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(interval_s)

    def do_GET(self) -> None:
        ranged = self.headers.get("Range", "")
        with self.hub.lock:
            self.hub.requests.append((self.path, ranged))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        rule = self.hub.rule(self.path)
        if rule is not None and rule.errors > 0:
            with self.hub.lock:
                rule.errors -= 1
            self.send_error(rule.status)
            return
        data = path.read_bytes()
        start = int(ranged[6:].split("-")[0]) if ranged.startswith("bytes=") else 0
        body = data[start:]
        status = "206 Partial Content" if start else "200 OK"
        head = (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                + (f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n" if start
                   else "") + "Connection: close\r\n\r\n").encode()
        self.close_connection = True
        try:
            if rule is not None and rule.trickle_headers:
                self._slowly(head, rule.interval_s)
                return
            self.wfile.write(head)
            if rule is not None and rule.cuts > 0:
                with self.hub.lock:
                    rule.cuts -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                return
            if rule is not None and rule.trickle:
                self._slowly(body, rule.interval_s)
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up: what the test wants
