"""Run folders of resumable passes: a key file records what the written parts were computed from."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def claim_run_dir(parts: Path, key_file: Path, key: dict[str, Any], overwrite: bool, pattern: str,
                  error: Exception) -> None:
    """Record ``key`` in ``key_file`` before parts are written to ``parts``.

    Parts left by a run with another key are refused (``error`` is raised) or, with ``overwrite``,
    deleted (the files of ``parts`` matching ``pattern``); parts of the same run are kept for resuming.
    """
    key = json.loads(json.dumps(key))
    if key_file.exists() and json.loads(key_file.read_text()) != key:
        if not overwrite:
            raise error
        for p in parts.glob(pattern):
            p.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=2))
