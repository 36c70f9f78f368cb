"""Content fingerprints that tie every output to its inputs (checkpoints, Fishers, queries, configs)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping


def file_fingerprint(path: str) -> str:
    """A short content hash of a file (first 16 hex digits of blake2b), to tie outputs to inputs."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def items_fingerprint(item_ids: list[str]) -> str:
    """A short hash of an ordered list of item ids."""
    return hashlib.blake2b("\n".join(item_ids).encode(), digest_size=8).hexdigest()


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of a settings dict (names factor and score folders, keys recorded table settings)."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()
