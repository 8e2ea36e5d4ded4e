"""Small real shard folders for stream tests: JPEG/PNG made with PIL, `ShardWriter`, `meta.json`.

Stands in for `tench shard` until the sharder lands; it writes the same files (tar shards
plus a `meta.json` with the keys of `shards/format.py`), so swapping it for the real
sharder changes no test.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shards.format import FORMAT_VERSION, META_NAME, encode_info, sample_key
from shards.vocab import Vocab
from shards.writer import ShardWriter

CLASSES = ("cat", "dog", "fish")


@dataclass
class ShardSet:
    folder: Path
    meta: dict
    labels: dict  # split -> {sample key: label index}


def make_image(rng: np.random.Generator, size: tuple[int, int], noise: bool) -> np.ndarray:
    """A (H, W, 3) uint8 picture: random noise (does not compress) or a flat colour + edge."""
    w, h = size
    if noise:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    img[: h // 3] = 255 - img[0, 0]
    return img


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_shards(folder: str | Path, counts: dict | None = None, *, image_size=(40, 36),
                samples_per_shard: int = 10, noise: bool = False, seed: int = 0,
                prefix: str = "") -> ShardSet:
    """Write `counts` samples per split into shards of about `samples_per_shard` each.

    Every fifth image is a PNG, the rest JPEG; labels cycle over `CLASSES`. `prefix` starts
    every image's path (and so its key), to tell two sets apart.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": 50, "valid": 20}
    rng = np.random.default_rng(seed)
    vocab = Vocab(CLASSES)
    splits, labels = {}, {}
    pixel_sum, pixel_sq, pixel_count = np.zeros(3), np.zeros(3), 0
    for split, n in counts.items():
        images = []
        for i in range(n):
            label = CLASSES[i % len(CLASSES)]
            img = make_image(rng, image_size, noise)
            ext, fmt = ("png", "PNG") if i % 5 == 4 else ("jpg", "JPEG")
            rel = f"{prefix}{split}/{label}/{i:05d}.{ext}"
            images.append((sample_key(rel), ext, encode(img, fmt), vocab.encode(label), rel))
            if split == "train":
                flat = img.reshape(-1, 3) / 255.0
                pixel_sum += flat.sum(0)
                pixel_sq += (flat**2).sum(0)
                pixel_count += len(flat)
        # cap by bytes so every shard holds about `samples_per_shard` samples
        biggest = max((len(data) for _, _, data, _, _ in images), default=0)
        max_bytes = samples_per_shard * (biggest + 4 * 512 + 4 * 512)  # four members each
        with ShardWriter(folder, split, max_bytes=max_bytes) as writer:
            for key, ext, data, index, rel in images:
                writer.write(key, ext, data, index, encode_info(rel, vocab.decode(index)))
        shards = [s.to_json() for s in writer.shards]
        splits[split] = {"count": n, "shards": shards}
        labels[split] = {key: index for key, _, _, index, _ in images}
    mean = pixel_sum / max(pixel_count, 1)
    std = np.sqrt(np.maximum(pixel_sq / max(pixel_count, 1) - mean**2, 0))
    meta = {
        "format_version": FORMAT_VERSION,
        **vocab.to_json(),
        "splits": splits,
        "stats": {"mean": mean.tolist(), "std": std.tolist()},
        "skipped": [],
    }
    (folder / META_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return ShardSet(folder, meta, labels)


def truncate_shard(folder: str | Path, name: str, keep_fraction: float = 0.5,
                   at_sample: int | None = None) -> None:
    """Cut a shard like an interrupted copy: at a fraction of its bytes (mid-member), or
    exactly where sample `at_sample` starts (which `tarfile` alone reads as a short, valid tar).
    """
    path = Path(folder) / name
    data = path.read_bytes()
    if at_sample is None:
        cut = int(len(data) * keep_fraction) + 100
    else:
        with tarfile.open(path) as tar:
            firsts, keys = [], set()  # the first member of each sample
            for member in tar.getmembers():
                key = member.name.split(".", 1)[0]
                if key not in keys:
                    keys.add(key)
                    firsts.append(member)
            cut = firsts[at_sample].offset
    path.write_bytes(data[:cut])


@contextlib.contextmanager
def serve_http(folder: str | Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1 (a free port) in a thread; yields its URL."""
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_s3(folder: str | Path, bucket: str = "tench") -> Iterator[tuple[str, dict]]:
    """Upload `folder` to an S3-compatible server (moto) on 127.0.0.1; yields (url, options).

    The options are what a user passes as `storage_options` for any S3-compatible store:
    the endpoint and the credentials, so nothing depends on the environment.
    """
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing",
                   "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.call_s3("create_bucket", Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            fs.put_file(str(path), f"{bucket}/shards/{path.name}")
        yield f"s3://{bucket}/shards", options
    finally:
        server.stop()
