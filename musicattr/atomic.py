"""Atomic writes: a file is either absent, or complete (written to a temporary name, then renamed)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


_TEMPORARY = re.compile(r"\.\d+-[0-9a-f]{8}\.tmp(\.[^.]*)?$")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a temporary name of ``atomic_path`` / ``atomic_dir`` (``x.parquet.<pid>-<id>.tmp.parquet``): a
    write in progress, or the leftover of one killed by kill -9. Globs over finished files skip these."""
    return bool(_TEMPORARY.search(Path(path).name))


def finished_files(paths) -> list[Path]:
    """The paths of a glob that are finished files, not temporaries of a write in progress or killed."""
    return sorted(Path(p) for p in paths if not is_temporary(p))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    The temporary name is unique per process and call, so ranks writing the same file never collide, and
    keeps the file's suffix (``x.wav`` -> ``x.wav.<pid>-<id>.tmp.wav``) for writers that infer the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` (and what it held)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))
