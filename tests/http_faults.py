"""An HTTP file server on 127.0.0.1 that counts requests and misbehaves on cue.

`serve_faulty(folder)` serves a folder like `http.server` does, plus `Range` requests
(206), and logs every GET as `(path, range header)`. `server.fail(name, *faults)` queues
faults for a file's next GETs, one per request, each a tuple:

- `("status", 500)`: answer that status and no body;
- `("stall", n, seconds)`: send the headers and `n` bytes, go quiet for `seconds` (None:
  until the server stops), then close;
- `("close", n)`: send the headers and `n` bytes, then drop the connection;
- `("delay", seconds)`: wait, then answer normally;
- `("hold", n, event)`: send the headers and `n` bytes, wait for the `threading.Event`
  (or the server to stop), then drop the connection.

`server.sent(name)` counts the body bytes handed to the socket so far (written in pieces
of `PIECE` bytes, each counted once the socket took it).
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path

PIECE = 64 << 10


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.folder = Path(folder)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.gets: list[tuple[str, str | None]] = []
        self.sent_bytes: dict[str, int] = defaultdict(int)
        self.faults: dict[str, deque] = defaultdict(deque)
        self.ignore_range = False
        self.send_buffer: int | None = None  # SO_SNDBUF: `sent` then trails the client closely
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def fail(self, name: str, *faults: tuple) -> None:
        with self.lock:
            self.faults[f"/{name}"].extend(faults)

    def count(self, suffix: str = "") -> int:
        """GETs so far for paths ending in `suffix`."""
        with self.lock:
            return sum(1 for path, _ in self.gets if path.endswith(suffix))

    def sent(self, name: str) -> int:
        """Body bytes of `name` the sockets took so far, over all its GETs."""
        with self.lock:
            return self.sent_bytes[f"/{name}"]

    def ranges(self, name: str) -> list:
        with self.lock:
            return [r for path, r in self.gets if path == f"/{name}"]


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    server: FaultyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        if self.server.send_buffer is not None:
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.server.send_buffer)
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.gets.append((path, self.headers.get("Range")))
            fault = srv.faults[path].popleft() if srv.faults[path] else None
        if fault and fault[0] == "status":
            self.send_response(fault[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault and fault[0] == "delay":
            srv.stopping.wait(fault[1])
        file = srv.folder / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not srv.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault and fault[0] in ("stall", "close", "hold"):
            self._send(path, body[:fault[1]])
            if fault[0] == "stall":
                srv.stopping.wait(fault[2])
            if fault[0] == "hold":
                while not (fault[2].is_set() or srv.stopping.is_set()):
                    fault[2].wait(0.05)
            self.close_connection = True
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up
            self._send(path, body)

    def _send(self, path: str, body: bytes) -> None:
        for at in range(0, len(body), PIECE):
            piece = body[at:at + PIECE]
            self.wfile.write(piece)
            self.wfile.flush()
            with self.server.lock:
                self.server.sent_bytes[path] += len(piece)


@contextlib.contextmanager
def serve_faulty(folder: str | Path) -> Iterator[FaultyServer]:
    server = FaultyServer(Path(folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
