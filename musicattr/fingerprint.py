"""Content fingerprints that tie every output to its inputs (checkpoints, Fishers, queries, configs)."""
from __future__ import annotations

import hashlib


def file_fingerprint(path: str) -> str:
    """A short content hash of a file (first 16 hex digits of blake2b), to tie outputs to inputs."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
