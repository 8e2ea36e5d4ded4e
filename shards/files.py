"""Find the files under a folder: the first step of the Data Block API.

`get_files` walks with `os.scandir` (one `stat` per entry, not two), skips hidden
files and folders, matches extensions case-insensitively, and remembers every real
directory it has entered so a symlink loop cannot make it walk forever.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterable
from pathlib import Path

# The built-in table only (`MimeTypes()` reads no system files), so the set is the same
# on every machine; plus the names people actually give image files.
_BUILTIN_TYPES = mimetypes.MimeTypes().types_map[True]
image_extensions: frozenset[str] = frozenset(
    {ext for ext, kind in _BUILTIN_TYPES.items() if kind.startswith("image/")}
    | {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)


def normalise_extensions(extensions: Iterable[str] | None) -> frozenset[str] | None:
    """`{"JPG", ".png"}` -> `{".jpg", ".png"}`; None means every file."""
    if extensions is None:
        return None
    if isinstance(extensions, str):  # "jpg" would otherwise become {"j", "p", "g"}
        extensions = [extensions]
    return frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def is_hidden(name: str) -> bool:
    """Dot-names (`.DS_Store`, `.git`, `._photo.jpg`) are tool droppings, not data."""
    return name.startswith(".")


def get_files(
    path: str | Path,
    extensions: Iterable[str] | None = None,
    recurse: bool = True,
    include: Iterable[str] | None = None,
) -> list[Path]:
    """Every non-hidden file under `path` whose extension is in `extensions`, sorted.

    `recurse=False` lists `path` itself only. `include` names the top-level folders to
    descend into (files directly in `path` are still listed). Symlinked folders are
    followed, but each real folder is entered once, so loops end. A symlink to a file
    that no longer exists is still listed, so whoever reads it reports it rather than
    it vanishing unnoticed. Paths are returned as `path / relative`, not resolved.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: is a file, expected a folder of images")
    wanted = normalise_extensions(extensions)
    top_level = None if include is None else set(include)
    visited: set[tuple[int, int]] = set()  # (device, inode) of each real folder entered
    found: list[Path] = []
    pending: list[tuple[Path, set[str] | None]] = [(root, top_level)]  # a stack, not recursion
    while pending:
        folder, only = pending.pop()
        st = os.stat(folder)  # follows a symlink: the identity of the real folder
        if (st.st_dev, st.st_ino) in visited:
            continue
        visited.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                try:
                    is_dir = entry.is_dir()  # follows symlinks
                except OSError:  # a symlink to itself (ELOOP): listed below, its reader says why
                    is_dir = False
                if is_dir:
                    if recurse and (only is None or entry.name in only):
                        pending.append((Path(entry.path), None))  # include: top level only
                    continue
                dangling = entry.is_symlink() and not os.path.exists(entry.path)
                ext = os.path.splitext(entry.name)[1].lower()
                if (dangling or entry.is_file()) and (wanted is None or ext in wanted):
                    found.append(Path(entry.path))
    return sorted(found)


def relative_path(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root`, with "/" on every system: how shards name a file.

    A path listed under `root` (`root / rel`, as `get_files` gives) is cut by string, with
    no `Path` parsing: a plan makes this call for every file of SRC. Anything else goes
    through `os.path.relpath`.
    """
    text, base = os.fspath(path), os.fspath(root)
    prefix = base if base.endswith(os.sep) else base + os.sep
    if base not in ("", ".") and text.startswith(prefix):
        rel = os.path.normpath(text[len(prefix):])
    else:
        rel = os.path.relpath(os.path.abspath(text), os.path.abspath(base))
    return rel if os.sep == "/" else rel.replace(os.sep, "/")
