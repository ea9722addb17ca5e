"""Atomic file and folder writes, hashing and the user cache dir.

Everything Polychrome writes (exports, checkpoints, caches) goes through a temporary sibling and an
``os.replace``, so an interrupted write never leaves a half-written file where a reader looks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_dir",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_dir",
    "sha256_file",
    "temp_sibling",
]


def temp_sibling(path: str | os.PathLike[str], directory: bool = False) -> tuple[int | None, str]:
    """A new hidden, uniquely named file (or folder) beside `path`: (an open fd, its name), or
    (None, name) for a folder. Unlike tempfile.mkstemp / mkdtemp (0600 / 0700) it gets the mode
    a plain open() or mkdir() would, 0666 / 0777 less the umask, so what is renamed into place
    is as readable as anything else the user writes; a file that replaces one takes its mode."""
    path = Path(path)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
                return None, str(tmp)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.chmod(fd, stat.S_IMODE(path.stat().st_mode))  # the file it will replace
        return fd, str(tmp)
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[object]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_sibling(path)
    assert fd is not None
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)  # type: ignore[attr-defined]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)  # type: ignore[attr-defined]


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    With overwrite=False an existing `path` raises FileExistsError before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_sibling(path, directory=True)[1])
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(*parts: str) -> Path:
    """The user's Polychrome cache dir ($POLYCHROME_CACHE, else $XDG_CACHE_HOME/polychrome)."""
    root = os.environ.get("POLYCHROME_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        root = os.path.join(xdg, "polychrome")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
