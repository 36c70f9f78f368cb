"""The queries of a counterfactual campaign, and their losses under a retrained model.

The queries are those of a ``musicattr compare`` run (its ``queries.csv``): generated from test prompts
(kind ``generated``), from the captions of planted tracks (``planted``), or training items attributed as
queries (``training``). The query loss is the contract's per-item loss with fixed draws,

    L(z_q, theta) = 1/T sum_{j<T} L_{t_j}(z_q)      draws keyed (seed, 'counterfactual/' + query id, j)

so every retrained model is measured on the same (t, eps) draws (common random numbers).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from musicattr.attribution.loss import COUNTERFACTUAL

KINDS = ("generated", "planted", "training")


@dataclass(frozen=True)
class Query:
    query_id: str
    kind: str                      # generated | planted | training
    prompt: str
    query_file: str | None = None  # generated/<qid>.query.safetensors (generated and planted)
    item_id: str | None = None     # the training item (training)
    planted_group: str | None = None  # file_name of the planted original (planted)


def _text(v) -> str | None:
    return None if v is None or (isinstance(v, float) and pd.isna(v)) or v == "" else str(v)


def read_queries(compare: str | Path) -> list[Query]:
    """The queries of the compare run in ``compare``, in its order."""
    compare = Path(compare)
    listing = compare / "queries.csv"
    if not listing.exists():
        raise FileNotFoundError(f"{listing} not found: {compare} is not the out_dir of a finished `musicattr compare`; "
                                "fix: run `musicattr compare` (make figure1) first, or point `compare` at its out_dir")
    out = []
    for r in pd.read_csv(listing, dtype={"query_id": str, "query_item": str}).to_dict("records"):
        planted = _text(r.get("planted_group"))
        kind = _text(r.get("kind")) or ("planted" if planted else "generated")
        qid = str(r["query_id"])
        if kind == "training":
            out.append(Query(qid, kind, str(r.get("prompt", "")), item_id=_text(r.get("query_item"))))
        else:
            out.append(Query(qid, kind, str(r.get("prompt", "")),
                             query_file=str(compare / "generated" / f"{qid}.query.safetensors"), planted_group=planted))
    return out


def select_queries(queries: list[Query], selection: list[str] | dict[str, int] | None) -> list[Query]:
    """``None``: every query; a list: those query ids; a dict: the first n queries of each kind."""
    if selection is None:
        return list(queries)
    if isinstance(selection, dict):
        unknown = sorted(set(selection) - set(KINDS))
        if unknown:
            raise ValueError(f"query kinds {unknown} unknown; fix: count queries by kind among {list(KINDS)}")
        out = [q for kind, n in selection.items() for q in [q for q in queries if q.kind == kind][:int(n)]]
        return sorted(out, key=queries.index)
    by_id = {q.query_id: q for q in queries}
    missing = [s for s in selection if s not in by_id]
    if missing:
        raise KeyError(f"queries {missing} are not in the compare run (it has {sorted(by_id)}); fix: name queries "
                       "of its queries.csv")
    return [by_id[s] for s in selection]


def query_batch_of(q: Query, store: str) -> dict:
    """A batch of one for the query: its generated latent, or its training item."""
    from musicattr.data.queries import query_batch

    if q.kind == "training":
        return query_batch(query_item=q.item_id, store=store)
    return query_batch(query=q.query_file)


def queries_fingerprint(queries: list[Query], store: str) -> str:
    """Content fingerprint of the queries: their records and their latents (files, or the store's items)."""
    from musicattr.data.queries import query_fingerprint

    h = hashlib.blake2b(digest_size=8)
    for q in queries:
        h.update(json.dumps(asdict(q), sort_keys=True).encode())
        h.update(query_fingerprint(q.query_file, q.item_id if q.kind == "training" else None, store).encode())
    return h.hexdigest()


def query_losses(task, model, queries: list[Query], store: str, seed: int, num_draws: int, mask: bool = False,
                 device: str = "cpu") -> dict[str, float]:
    """L(z_q, theta) of each query under ``model`` (the task's loss; draws keyed ``counterfactual/<id>``)."""
    model.to(device).eval()
    out = {}
    with torch.no_grad():
        for q in queries:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in query_batch_of(q, store).items()}
            out[q.query_id] = float(task.item_loss(model, batch, seed, num_draws, namespace=COUNTERFACTUAL,
                                                   mask=mask)[0])
    return out
