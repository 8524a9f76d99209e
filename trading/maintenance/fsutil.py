"""Durable file operations shared by compaction, rotation and backup: checksums, copies that
are on disk when they return, directory fsync (a rename or unlink is durable only then)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> FileDigest:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(size, digest.hexdigest())


def copy_durable(src: Path, dst: Path) -> FileDigest:
    """Copy `src` to `dst` (parents created), fsync it, and return the digest of the bytes copied.

    The digest is of what was written, so it stays true when `src` grows during the copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as source, open(dst, "wb") as target:
        while chunk := source.read(_CHUNK):
            target.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        target.flush()
        os.fsync(target.fileno())
    return FileDigest(size, digest.hexdigest())


def fsync_tree(root: Path) -> None:
    """fsync every directory under `root` (deepest first) and `root` itself."""
    directories = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for directory in [*directories, root]:
        fsync_dir(directory)


def is_within(path: Path, root: Path) -> bool:
    """True when `path` is `root` or lies under it (both resolved, so symlinks and `..` count)."""
    return path.resolve().is_relative_to(root.resolve())
