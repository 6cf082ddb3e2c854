"""A real hub over loopback HTTP: a ThreadingHTTPServer serving a hub folder, with Range
support and a hook that cuts the next response to a chosen file halfway."""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class HubServer:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; :meth:`close` stops it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cut_next: set[str] = set()
        """File name suffixes whose next response is cut halfway (then served normally)."""
        self.range_requests: list[str] = []
        self._lock = threading.Lock()
        handler = partial(_Handler, self, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server")
        self._thread.start()

    def take_cut(self, path: str) -> bool:
        with self._lock:
            for suffix in list(self.cut_next):
                if path.endswith(suffix):
                    self.cut_next.discard(suffix)
                    return True
        return False

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, hub: HubServer, *args: Any, **kwargs: Any) -> None:
        self.hub = hub
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        return  # keep test output clean

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0])
            self.hub.range_requests.append(self.path)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.hub.take_cut(self.path):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
