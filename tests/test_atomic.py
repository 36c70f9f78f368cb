"""A write killed by kill -9 leaves its temporary behind: finished-file globs must not read it as a part."""
from pathlib import Path

import pytest

from musicattr.atomic import atomic_path, finished_files, is_temporary
from musicattr.parts import Parts, TableFormat


def killed_write(path: Path) -> Path:
    """The temporary a write of ``path`` leaves when killed before its rename: half a file."""
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            leftover = tmp  # the name atomic_path chose
            raise KeyboardInterrupt  # the finally of atomic_path removes it; kill -9 would not
    leftover.write_bytes(b"PAR1 half a parquet file")  # as kill -9 leaves it
    return leftover


def test_temporary_names_are_recognised():
    assert is_temporary("part-r0-abc.parquet.1234-0a1b2c3d.tmp.parquet")
    assert is_temporary("x.1234-0a1b2c3d.tmp")
    assert not is_temporary("part-r0-abc.parquet")
    assert not is_temporary("shard-00001.json")


def test_parts_skip_a_killed_writes_temporary(tmp_path):
    parts = Parts(tmp_path / "parts", TableFormat())
    parts.claim()
    written = parts.write(0, [{"index": [0, 1], "score": [0.5, 0.25]}])
    leftover = killed_write(tmp_path / "parts" / "part-r0-killed.parquet")
    assert leftover.exists() and leftover.match("part-*.parquet")  # the glob alone would read it
    assert parts.files() == [written]
    assert parts.done() == {0, 1}
    assert TableFormat().read(parts.files())["index"].tolist() == [0, 1]
    assert finished_files([leftover, written]) == [written]
