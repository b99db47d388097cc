"""Durable file writes shared by every stage: fsync of files and folders and the atomic replace of a
file, so a crash leaves either the old file or the whole new one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file below `folder`, then every folder (deepest first), then `folder` itself."""
    dirs = []
    for root, _, filenames in os.walk(Path(folder)):
        dirs.append(root)
        for name in filenames:
            _fsync_path(os.path.join(root, name), os.O_RDONLY)
    for root in reversed(dirs):
        fsync_dir(root)


def fsync_dir(folder: str | os.PathLike) -> None:
    _fsync_path(os.fspath(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that a reader sees the old file or the whole new one: a temporary file,
    fsync, rename, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync_path(str(tmp), os.O_RDONLY)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


__all__ = ["fsync_dir", "fsync_tree", "write_atomic"]
