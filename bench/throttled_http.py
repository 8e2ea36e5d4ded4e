"""A file server on 127.0.0.1 that behaves like object storage: slow to answer, capped in speed.

Every GET waits `latency` seconds before answering (the time to first byte of a bucket) and
then sends its body at most `rate` bytes/s on that connection (a per-connection cap, as S3
and GCS have), in 64 KiB pieces paced against the clock. `Range: bytes=N-` gets a 206, as
`pipeline.remote` asks for when it resumes a broken read. The server counts requests and
the body bytes it actually wrote (a client that hangs up early is charged only for what
left), per file kind; `GET /_stats` returns the counts as JSON and is not counted itself.

Run alone (`python bench/throttled_http.py FOLDER --latency-ms 50 --mbps 20`) it prints
its URL on the first line and serves until killed; `serve_throttled(...)` runs it in a
thread for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

PIECE = 64 << 10
STATS_PATH = "/_stats"


class ThrottledServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: str | Path, latency: float, rate: float):
        super().__init__(("127.0.0.1", 0), ThrottledHandler)
        self.folder, self.latency, self.rate = Path(folder), latency, rate
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: fine
            super().handle_error(request, client_address)

    def add(self, **counts: int) -> None:
        with self.lock:
            self.counts.update(counts)

    def stats(self) -> dict:
        """{"requests", "tar_requests", "tar_bytes", "other_bytes"} served so far."""
        with self.lock:
            return {k: self.counts.get(k, 0)
                    for k in ("requests", "tar_requests", "tar_bytes", "other_bytes")}


class ThrottledHandler(http.server.BaseHTTPRequestHandler):
    server: ThrottledServer
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next GET reuses its connection

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        path = self.path.split("?", 1)[0]
        if path == STATS_PATH:
            self._send(200, json.dumps(self.server.stats()).encode(), "application/json")
            return
        is_tar = path.endswith(".tar")
        self.server.add(requests=1, tar_requests=int(is_tar))
        time.sleep(self.server.latency)
        file = (self.server.folder / path.lstrip("/")).resolve()
        if self.server.folder.resolve() not in file.parents or not file.is_file():
            self._send(404, b"not found\n", "text/plain")
            return
        data = file.read_bytes()
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted[6:].split("-")[0].isdigit():
            start = min(int(wanted[6:].split("-")[0]), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = memoryview(data)[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        kind = "tar_bytes" if is_tar else "other_bytes"
        began, sent = time.perf_counter(), 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client left
            while sent < len(body):
                ahead = began + sent / self.server.rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
                piece = body[sent:sent + PIECE]
                self.wfile.write(piece)
                sent += len(piece)
                self.server.add(**{kind: len(piece)})

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serve_throttled(folder: str | Path, latency: float, rate: float
                    ) -> Iterator[ThrottledServer]:
    """A `ThrottledServer` on a free port, serving from a thread until the block ends."""
    server = ThrottledServer(folder, latency, rate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--mbps", type=float, default=20.0, help="MB/s per connection")
    args = parser.parse_args()
    server = ThrottledServer(args.folder, args.latency_ms / 1000, args.mbps * 1e6)
    print(server.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
