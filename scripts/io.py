"""Files written whole or not at all: a temporary file in the destination's folder, fsynced, then renamed."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "file_sha256", "keep_aside"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], mode: int = 0o644) -> Path:
    """Writes ``path`` atomically with ``write(binary_file)``: a crash (even SIGKILL) leaves the old file (or
    none), never a truncated one.

    The temporary name is unique per call, so concurrent writers never share it; the last rename wins. The file
    gets ``mode`` (``mkstemp`` would leave it readable by its owner only) and the folder is fsynced after the
    rename, so the new name survives a power cut too.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(dest.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename is still atomic
        return dest
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return dest


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Writes ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20, missing: str | None = None) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks; e.g. the checkpoint an evaluation ran with.

    Args:
        missing: returned when ``path`` is not a file (None: the ``FileNotFoundError`` is raised).
    """
    if missing is not None and not os.path.isfile(path):
        return missing
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def keep_aside(path: str | os.PathLike) -> Path:
    """Renames ``path`` to ``<stem>.replaced-<YYYYmmdd-HHMMSS>[-N]<suffix>`` in its folder, so that a file about to
    be written in its place (a shipped model, another run's best) is kept rather than overwritten; returns the new
    path. A name already taken (two replacements within one second) gets the next free ``-N``: never overwritten.
    """
    src = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept, n = src.with_name(f"{src.stem}.replaced-{stamp}{src.suffix}"), 1
    while kept.exists():
        kept, n = src.with_name(f"{src.stem}.replaced-{stamp}-{n}{src.suffix}"), n + 1
    os.replace(src, kept)
    return kept
