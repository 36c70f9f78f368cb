"""Per-item caches in the latent store (baseline losses L(z_i, theta0) with their per-draw losses, so that a
later query's score has its standard error; sensitivities s_i).

A cache file is named by a hash of its key: every setting that changes the cached floats (checkpoint,
store content, draws, seed, mask, dtype, device type, and for s_i the Fisher, tensors and damping). A
run under other settings reads another file, never a stale one. What the key leaves out (batch
composition, ``draws_per_forward``) changes the floats by reduction order only; the scoring run
measures that noise floor and reports it (``noise.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from musicattr.atomic import atomic_path, atomic_write_json


def baseline_key(checkpoint_fingerprint: str, store, task, model, num_draws: int, seed: int, mask_loss: bool,
                 device: torch.device | str) -> dict[str, Any]:
    """What L(z_i, theta0; M_L) over the T scoring draws depends on, beyond reduction order (the key of the
    baseline cache): theta0, the store's content, the task (and its timestep sampler), T, seed, M_L, the dtype
    and the device type."""
    dtype = next(iter(task.net(model).parameters())).dtype
    return {"checkpoint_fingerprint": checkpoint_fingerprint, "store_fingerprint": store.fingerprint,
            **task.identity(), "num_draws": int(num_draws), "seed": int(seed), "mask_loss": bool(mask_loss),
            "dtype": str(dtype), "device": torch.device(device).type, "per_draw": True}


def sensitivity_key(baseline: dict[str, Any], fisher_fingerprint: str, tensors, damping: float,
                    ekfac_fingerprint: str | None = None) -> dict[str, Any]:
    """What s_i depends on: the baseline key, the Fisher, the tensors of g_i and the damping (and the EK-FAC factors
    when P is EK-FAC; the diagonal Fisher's key is unchanged)."""
    key = {**baseline, "fisher_fingerprint": fisher_fingerprint, "tensors": sorted(tensors), "damping": float(damping)}
    return key if ekfac_fingerprint is None else {**key, "ekfac_fingerprint": ekfac_fingerprint}


def cache_path(store_root: str | os.PathLike, kind: str, key: dict[str, Any]) -> Path:
    """``<store>/<kind>/<digest>.parquet``, the digest a hash of ``key`` (JSON, sorted keys)."""
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
    return Path(store_root) / kind / f"{digest}.parquet"


def read_cache(path: Path, column: str) -> dict[int, Any]:
    """item index -> cached value (a float, or an array for a per-draw column), or {} when there is no cache file."""
    if not path.exists():
        return {}
    df = pd.read_parquet(path, columns=["index", column])
    values = df[column] if df[column].dtype == object else df[column].astype(float)
    return dict(zip(df["index"].astype(int), values))


def write_cache(frame: pd.DataFrame, path: Path, key: dict[str, Any]) -> None:
    """Write a cache atomically (and its key beside it, ``<digest>.json``), unless it exists already."""
    if path.exists():
        return
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    atomic_write_json(path.with_suffix(".json"), key)
