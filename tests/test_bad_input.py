"""Bad input for `tench shard`, each a real file: kept and convertible, or skipped with a reason.

One source tree holds every case (built once per module); the shards are read back with
webdataset and tarfile, and kept images are decoded by the stream's decoder
(`pipeline.decode`), which is where their conversion to RGB happens.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.format import META_NAME
from shards.images import check_image
from shards.inspect import inspect_folder
from shards.shard_plan import plan
from shards.shard_run import prepare_out
from shards.sharder import ShardError, folder_data, shard_folder
from tests.test_sharder import image_bytes, read_shards

pytestmark = pytest.mark.timeout(120)  # a symlink loop must not hang the run
REPO = Path(__file__).resolve().parents[1]
ACCENTED = "crème brûlée 2"  # spaces and non-ASCII letters in a class folder name


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (20, 16), (0, 200, 200, 0)), "JPEG", quality=95)


def _sixteen_bit_png() -> bytes:
    values = np.full((16, 20), 40000, np.uint16)
    values[:, :5] = 65535
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return _encode(image, "PNG")


def _palette_png_with_transparency() -> bytes:
    image = Image.new("P", (20, 16), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, 1 blue
    image.paste(1, (0, 0, 10, 16))
    return _encode(image, "PNG", transparency=0)  # index 0 is see-through


def _exif_rotated_jpeg() -> bytes:
    pixels = np.zeros((20, 30, 3), np.uint8)  # stored 30 wide, 20 high
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes())


def _bomb_png(size: tuple[int, int]) -> bytes:
    """A 1-bit PNG of `size` pixels: a few KB on disk, over Pillow's pixel limit."""
    return _encode(Image.new("1", size), "PNG")


KEPT = {  # path -> stored extension
    "train/cat/plain_0.jpg": "jpg",
    "train/cat/plain_1.jpg": "jpg",
    "train/cat/png_named.jpg": "png",
    "train/cat/cmyk.jpg": "jpg",
    "train/dog/grey.jpg": "jpg",
    "train/dog/exif_rotated.jpg": "jpg",
    f"train/{ACCENTED}/palette.png": "png",
    f"train/{ACCENTED}/sixteen_bit.png": "png",
    "val/cat/v.jpg": "jpg",
    f"val/{ACCENTED}/v.png": "png",
}
SKIPPED = {  # path -> reason kind
    "train/cat/truncated.jpg": "corrupt image",
    "train/cat/empty.jpg": "empty file",
    "train/cat/text.jpg": "not an image",
    "train/cat/notes.txt": "no image extension",
    "train/dog/bomb_pillow_refuses.png": "decompression bomb",
    "train/dog/bomb_pillow_warns.png": "decompression bomb",
    "train/dog/gone.jpg": "unreadable file",  # a dangling symlink
    "train/dog/self.jpg": "unreadable file",  # a symlink to itself
    "train/stray.jpg": "outside the layout",
    "README.md": "no image extension",
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """(src, out, meta, samples by source path) for the tree of every case."""
    root = tmp_path_factory.mktemp("bad")
    src = root / "src"
    jpeg = image_bytes(1, "JPEG", (60, 40))
    data = {
        "train/cat/plain_0.jpg": image_bytes(2),
        "train/cat/plain_1.jpg": image_bytes(3),
        "train/cat/png_named.jpg": image_bytes(4, "PNG"),
        "train/cat/cmyk.jpg": _cmyk_jpeg(),
        "train/dog/grey.jpg": _encode(Image.new("L", (20, 16), 90), "JPEG"),
        "train/dog/exif_rotated.jpg": _exif_rotated_jpeg(),
        f"train/{ACCENTED}/palette.png": _palette_png_with_transparency(),
        f"train/{ACCENTED}/sixteen_bit.png": _sixteen_bit_png(),
        "val/cat/v.jpg": image_bytes(5),
        f"val/{ACCENTED}/v.png": image_bytes(6, "PNG"),
        "train/cat/truncated.jpg": jpeg[: len(jpeg) // 2],
        "train/cat/empty.jpg": b"",
        "train/cat/text.jpg": b"hello, this is not a picture\n",
        "train/cat/notes.txt": b"labels were checked by hand\n",
        "train/dog/bomb_pillow_refuses.png": _bomb_png((14000, 14000)),  # > 2x the limit
        "train/dog/bomb_pillow_warns.png": _bomb_png((10000, 9500)),  # > 1x the limit
        "train/stray.jpg": image_bytes(7),
        "README.md": b"# my images\n",
        "train/cat/.DS_Store": b"\0\0\0\1Bud1",
        ".DS_Store": b"\0\0\0\1Bud1",
    }
    for rel, content in data.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    (src / "train/empty").mkdir()  # an empty class folder
    (src / "train/dog/gone.jpg").symlink_to(src / "train/dog/missing.jpg")
    (src / "train/dog/self.jpg").symlink_to("self.jpg")
    (src / "train/cat/loop").symlink_to("..", target_is_directory=True)  # train/cat/loop -> train
    out = root / "out"
    meta = shard_folder(src, out, processes=2, progress=False)
    samples = {s["info"]["path"]: s for s in read_shards(out).values()}
    return src, out, meta, samples


@pytest.mark.parametrize("rel", sorted(KEPT))
def test_convertible_images_are_kept_with_original_bytes_under_their_real_format(sharded, rel):
    src, _, _, samples = sharded
    sample = samples[rel]
    assert sample["image"] == (src / rel).read_bytes()
    assert sample["ext"] == KEPT[rel]
    assert sample["info"] == {"path": rel, "label": rel.split("/")[1]}


@pytest.mark.parametrize("rel", sorted(SKIPPED))
def test_unusable_files_are_skipped_with_their_reason(sharded, rel):
    _, _, meta, samples = sharded
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert reasons[rel].startswith(SKIPPED[rel] + ": ")
    assert rel not in samples


def test_nothing_else_is_written_or_reported(sharded):
    src, out, meta, samples = sharded
    assert set(samples) == set(KEPT)  # each once: read_shards refuses duplicates
    assert {s["path"] for s in meta["skipped"]} == set(SKIPPED)  # .DS_Store: not even skipped
    assert meta["splits"]["train"]["count"] == 8 and meta["splits"]["valid"]["count"] == 2
    assert inspect_folder(out, write=lambda line: None) == []


def test_class_names_are_kept_exactly_and_empty_folders_make_no_class(sharded):
    _, out, meta, samples = sharded
    assert meta["vocab"] == sorted(["cat", "dog", ACCENTED])  # no "empty": it has no labels
    assert samples[f"val/{ACCENTED}/v.png"]["label"] == meta["vocab"].index(ACCENTED)
    assert ACCENTED in (out / META_NAME).read_text(encoding="utf-8")  # not \u-escaped


def test_reasons_say_what_is_wrong(sharded):
    _, _, meta, _ = sharded
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert "truncated" in reasons["train/cat/truncated.jpg"]
    assert reasons["train/cat/text.jpg"].startswith("not an image: ")
    assert "hello" not in reasons["train/cat/text.jpg"]  # the kind of problem, never content
    assert "10000x9500 = 95,000,000 pixels" in reasons["train/dog/bomb_pillow_warns.png"]
    assert "No such file" in reasons["train/dog/gone.jpg"]
    assert "symbolic links" in reasons["train/dog/self.jpg"]


def test_kept_images_decode_to_rgb_in_the_stream(sharded):
    from pipeline.decode import decode_image

    _, _, _, samples = sharded
    decoded = {rel: decode_image(s["image"], s["ext"], source=rel) for rel, s in samples.items()}
    for rel, pixels in decoded.items():
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, rel
    cmyk = decoded["train/cat/cmyk.jpg"]
    pil_rgb = np.asarray(Image.open(io.BytesIO(_cmyk_jpeg())).convert("RGB"))
    assert np.abs(cmyk.astype(int) - pil_rgb).max() <= 2
    assert (decoded["train/dog/grey.jpg"] == decoded["train/dog/grey.jpg"][:, :, :1]).all()
    assert decoded["train/dog/exif_rotated.jpg"].shape == (30, 20, 3)  # turned upright
    palette = decoded[f"train/{ACCENTED}/palette.png"]
    assert (palette[:, :10] == (0, 0, 255)).all() and (palette[:, 10:] == 255).all()
    sixteen = decoded[f"train/{ACCENTED}/sixteen_bit.png"]
    assert (sixteen[:, :5] == 255).all() and (sixteen[:, 5:] == 156).all()  # 40000/65535*255


def test_stats_use_the_same_rgb_conversion_as_the_stream(sharded):
    from pipeline.decode import decode_image

    _, _, meta, samples = sharded
    pixels = np.concatenate([
        decode_image(s["image"], s["ext"]).reshape(-1, 3) / 255.0
        for rel, s in samples.items() if s["split"] == "train"
    ])
    # CMYK goes through libjpeg-turbo in the stream and Pillow here: a pixel may differ by 1-2
    np.testing.assert_allclose(meta["stats"]["mean"], pixels.mean(0), atol=1e-3)
    np.testing.assert_allclose(meta["stats"]["std"], pixels.std(0), atol=1e-3)


def test_a_format_shards_do_not_store_is_converted_to_png_losslessly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    checked = check_image(_encode(Image.fromarray(pixels), "PPM"))
    assert checked.ext == "png" and checked.reencoded
    assert (np.asarray(Image.open(io.BytesIO(checked.data))) == pixels).all()


def test_max_size_turns_exif_rotated_and_16_bit_images_upright_and_8_bit(tmp_path):
    rotated = check_image(_exif_rotated_jpeg(), max_size=10)  # stored 30x20, shown 20x30
    image = Image.open(io.BytesIO(rotated.data))
    assert rotated.ext == "jpg" and image.size == (10, 15)
    assert image.getexif().get(0x0112) is None  # no orientation tag left to apply twice
    deep = check_image(_sixteen_bit_png(), max_size=8)
    image = Image.open(io.BytesIO(deep.data))
    assert deep.ext == "png" and image.mode == "L" and image.size == (10, 8)
    assert (np.asarray(image)[:, 5:] == 156).all()  # 40000 scaled to 156, not clipped at 255


def test_max_pixels_sets_the_bomb_limit():
    data = image_bytes(1, "PNG", (50, 40))
    assert check_image(data, max_pixels=2000).width == 50
    with pytest.raises(ValueError, match="decompression bomb: 50x40 = 2,000 pixels, over the "
                                         "limit of 1,999"):
        check_image(data, max_pixels=1999)


def test_on_error_fail_names_the_file_and_leaves_no_shards(tmp_path, capsys):
    from trainer.cli import main as cli_main

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(12):
        (src / "train/cat").mkdir(parents=True, exist_ok=True)
        (src / f"train/cat/{i}.jpg").write_bytes(image_bytes(i))
    bad = src / "train/cat/3.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    order = [job.rel for job in plan(folder_data(src)[0]).jobs["train"]]
    assert order.index("train/cat/3.jpg") >= 2  # so shards are finished before the error
    out.mkdir()
    with pytest.raises(ShardError, match=rf"{bad}: corrupt image: .*--on-error fail"):
        shard_folder(src, out, on_error="fail", max_count=1, progress=False)
    assert list(out.iterdir()) == []  # the shards finished before the error are gone
    assert cli_main(["shard", str(src), str(out), "--on-error", "fail"]) == 1
    assert f"{bad}: corrupt image" in capsys.readouterr().err


def test_src_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="SRC does not exist"):
        shard_folder(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty/train").mkdir(parents=True)
    (tmp_path / "empty/train/.DS_Store").write_bytes(b"x")
    with pytest.raises(ShardError, match="SRC holds no files"):
        shard_folder(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "junk/train/cat").mkdir(parents=True)
    (tmp_path / "junk/train/cat/a.jpg").write_bytes(b"")
    with pytest.raises(ShardError, match="none of the 1 training files is a usable image.*"
                                         "empty file"):
        shard_folder(tmp_path / "junk", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # made by the run, removed again


def test_out_not_writable_is_a_clear_error_before_any_work(tmp_path):
    src = tmp_path / "src"
    (src / "train/cat").mkdir(parents=True)
    (src / "train/cat/a.jpg").write_bytes(image_bytes(1))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ShardError, match="OUT exists and is a file"):
        shard_folder(src, a_file, progress=False)
    with pytest.raises(ShardError, match="cannot write to OUT"):
        shard_folder(src, a_file / "out", progress=False)  # a folder under a file


NOBODY = 65534  # the conventional uid and gid of `nobody`


def without_root(fn, *args) -> str:
    """Call `fn(*args)` without root's privileges; return the error it raised as text.

    Root ignores permission bits (and CI runs as root), so as root the call runs in a forked
    child that first becomes `nobody`: a fork, not a new interpreter, because the interpreter
    may live where `nobody` cannot read it (under /root).
    """
    def call() -> str:
        try:
            fn(*args)
        except Exception as e:  # what the caller asserts on, whatever its type
            return f"{type(e).__name__}: {e}"
        return "no error"

    if os.geteuid() != 0:
        return call()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)  # real, effective and saved: root's capabilities are dropped
            os.write(write, call().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the unprivileged child failed: {message}"
    return message


def test_out_without_write_permission_is_a_clear_error():
    # a fresh folder under the system temp dir: pytest's tmp_path sits in a folder only its
    # owner may enter, and `nobody` must reach SRC and OUT for the check to be about OUT
    base = Path(tempfile.mkdtemp(prefix="tench-locked-"))
    locked, writable = base / "locked", base / "writable"
    try:
        base.chmod(0o755)
        src = base / "src"
        (src / "train/cat").mkdir(parents=True)
        (src / "train/cat/a.jpg").write_bytes(image_bytes(1))
        locked.mkdir(mode=0o555)
        writable.mkdir()
        writable.chmod(0o777)
        # the control: the same user may write where the bits allow it
        assert without_root(prepare_out, writable, src, False) == "no error"
        for out in (locked, locked / "sub"):  # an existing OUT, and one to be made
            message = without_root(lambda o: shard_folder(src, o, progress=False), out)
            assert message == (f"ShardError: {out}: cannot write to OUT (Permission denied)")
        assert list(locked.iterdir()) == []
    finally:
        if locked.exists():
            locked.chmod(0o755)
        shutil.rmtree(base)


def _complete_tar(path: Path) -> int:
    """Read the whole tar; return its sample count (raises if cut short)."""
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert len(names) % 4 == 0, f"{path.name}: {len(names)} members"
    return len(names) // 4  # image, cls, json, crc32


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_kill_9_mid_run_leaves_nothing_that_looks_complete(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    rng = np.random.default_rng(0)
    for i in range(400):  # noise JPEGs: ~1 ms each to decode, so the run lasts a while
        (src / f"train/c{i % 4}").mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        (src / f"train/c{i % 4}/{i}.jpg").write_bytes(_encode(Image.fromarray(noise), "JPEG"))
    command = [sys.executable, "-m", "shards.sharder", str(src), str(out), "--processes", "2",
               "--max-count", "5"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("train-*.tar"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)  # the sharder only: its workers must notice
        proc.wait()
        deadline = time.monotonic() + 15
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(proc.pid), "worker processes outlived the killed sharder"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / META_NAME).exists()
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("train-") and n.endswith(".tar")]
    assert shards and all(_complete_tar(out / n) == 5 for n in shards)
    assert all(n in shards or (n.startswith(".") and n.endswith(".partial")) for n in names)
    # a re-run refuses the leftovers, and with --force clears them and finishes
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 1 and "--force" in rerun.stderr
    rerun = subprocess.run([*command, "--force"], cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert inspect_folder(out, write=lambda line: None) == []
    assert sum(_complete_tar(p) for p in out.glob("train-*.tar")) == 400
