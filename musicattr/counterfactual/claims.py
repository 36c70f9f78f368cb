"""Claims that let several ``musicattr bank`` workers share one plan: a worker fits a retrain only after it has
created ``<claims>/<name>.claim`` exclusively (``O_CREAT | O_EXCL``), and removes it when the retrain's record is
written. A claim whose worker is gone (same host, process not alive; or older than ``stale_s``) is taken over:
the retrain resumes from its last checkpoint, so a killed worker loses at most ``checkpoint_every`` steps.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's process: alive
        return True
    return True


class Claim:
    """An exclusive claim on one retrain (a context manager that releases it)."""

    def __init__(self, path: Path):
        self.path = path

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:               # being written by its worker right now, or torn: treat as held for now
        return {"host": socket.gethostname(), "pid": -1, "since": time.time()}


def try_claim(claims_dir: str | os.PathLike, name: str, stale_s: float = 6 * 3600) -> Claim | None:
    """Claim retrain ``name`` for this process, or None if a live worker holds it."""
    d = Path(claims_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.claim"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            h = _holder(path)
            if h is None:
                continue                                          # released meanwhile: try again
            if h.get("pid") == os.getpid() and h.get("host") == me["host"]:
                return Claim(path)
            gone = h.get("host") == me["host"] and h.get("pid", -1) > 0 and not _alive(int(h["pid"]))
            if not gone and time.time() - float(h.get("since", 0)) < stale_s:
                return None
            log.info("bank: %s was claimed by pid %s on %s, now gone: taking it over", name, h.get("pid"), h.get("host"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return Claim(path)
    return None


def wait_claim(claims_dir: str | os.PathLike, name: str, poll_s: float = 10.0) -> Claim:
    """Claim ``name``, waiting while a live worker holds it (one worker makes what all of them need)."""
    waited = False
    while True:
        c = try_claim(claims_dir, name)
        if c is not None:
            return c
        if not waited:
            log.info("bank: another worker holds %s: waiting for it", name)
            waited = True
        time.sleep(poll_s)


def live_claims(claims_dir: str | os.PathLike, stale_s: float = 6 * 3600) -> int:
    """How many claims in ``claims_dir`` are held by a live worker (the workers fitting right now)."""
    host, n = socket.gethostname(), 0
    for p in Path(claims_dir).glob("*.claim"):
        h = _holder(p)
        if h is None:
            continue
        if h.get("host") == host and h.get("pid", -1) > 0:
            n += _alive(int(h["pid"]))
        else:
            n += time.time() - float(h.get("since", 0)) < stale_s
    return n
