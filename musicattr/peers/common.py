"""What the peers share: the queries of a compare run, one-item batches and their concatenation, the linear layers
of a target group, and the resumable per-query scores tables."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from musicattr.atomic import atomic_write_json
from musicattr.attribution.scores_table import scores_table

log = logging.getLogger(__name__)
SETTINGS_FILE = "settings.json"
MADE_FILE = "made.json"   # beside what a peer pays for once (factors, training features): the seconds it took


def record_made(folder: str | Path, seconds: float) -> None:
    """Record in ``folder`` the seconds that making its contents took (the run that finished it)."""
    atomic_write_json(Path(folder) / MADE_FILE, {"seconds": round(float(seconds), 1)})


def made_seconds(folder: str | Path) -> float | None:
    """The seconds recorded by ``record_made`` in ``folder`` (None: made before such records were kept)."""
    path = Path(folder) / MADE_FILE
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else None


def concat_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch from batches (of the store's format): tensors concatenated along dim 0, lists joined; only the keys
    every batch has."""
    keys = [k for k in batches[0] if all(k in b for b in batches)]
    out = {}
    for k in keys:
        vals = [b[k] for b in batches]
        out[k] = torch.cat(vals, 0) if torch.is_tensor(vals[0]) else [x for v in vals for x in v]
    return out


def store_batches(store) -> list[dict[str, Any]]:
    """Every item of a latent store as a one-item batch, in the store's order (latents float32)."""
    from musicattr.data.datamodules import collate_items

    out = []
    for i in range(len(store)):
        item = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in store[i].items()
                if v is not None}
        out.append(collate_items([item]))
    return out


def compare_queries(compare: str | Path, store: str, query_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The queries of a ``musicattr compare`` run (:func:`musicattr.data.queries.compare_listing`), each with its
    ``batch``."""
    from musicattr.data.queries import compare_listing, query_batch

    out = compare_listing(compare, list(query_ids) if query_ids else None)
    for q in out:
        q["batch"] = query_batch(q["query"], q["query_item"], store if q["query_item"] else None)
    return out


def linear_layers(task, model, target: str = "all") -> dict[str, dict[str, str | None]]:
    """The ``nn.Linear`` modules of ``task.net(model)`` with a parameter in the target group: module name relative to
    ``model`` -> {"weight", "bias"}: the parameter names relative to the net (as ``select_parameters`` names them)."""
    net = task.net(model)
    prefix = next((n for n, m in model.named_modules() if m is net), None)
    if prefix is None:
        raise ValueError("task.net(model) is not a submodule of the model; fix: the task's net must be part of it")
    params = set(task.select_parameters(model, target))
    out = {}
    for n, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and f"{n}.weight" in params:
            out[f"{prefix}.{n}" if prefix else n] = {"weight": f"{n}.weight",
                                                     "bias": f"{n}.bias" if m.bias is not None else None}
    if not out:
        raise ValueError(f"the target group {target!r} holds no linear layer; fix: choose a group with linear layers")
    return out


def table_path(out_dir: str | Path, query_id: str, peer: str) -> Path:
    return Path(out_dir) / "queries" / query_id / peer / "scores.parquet"


def is_done(out_dir: str | Path, query_id: str, peer: str, settings: Mapping[str, Any]) -> bool:
    """The query's table exists and was made with these settings."""
    p = table_path(out_dir, query_id, peer)
    s = p.parent / SETTINGS_FILE
    if not (p.exists() and s.exists()):
        return False
    return json.loads(s.read_text()) == json.loads(json.dumps(settings, default=str))


def write_table(out_dir: str | Path, query_id: str, peer: str, items: pd.DataFrame, score: np.ndarray,
                settings: Mapping[str, Any], **columns) -> Path:
    """The schema's scores table of one query (``scores_table``) and its settings beside it."""
    p = table_path(out_dir, query_id, peer)
    p.parent.mkdir(parents=True, exist_ok=True)
    df = scores_table(items, score, peer, query_id, **columns)
    tmp = p.with_suffix(".tmp.parquet")
    df.to_parquet(tmp, index=False)
    tmp.replace(p)
    atomic_write_json(p.parent / SETTINGS_FILE, json.loads(json.dumps(settings, default=str)))
    return p
