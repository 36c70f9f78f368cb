"""Query files and one-item batches: a generated query z_hat (``<name>.query.safetensors`` of ``musicattr
generate``: latents, text embedding and its info) or a training item of the latent store, as the batch of one
that unlearning, the index query and the counterfactual losses take (the store's batch format)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from musicattr.atomic import atomic_path
from musicattr.data.datamodules import collate_items


def save_query(path: str | Path, latents: torch.Tensor, text_emb: torch.Tensor, info: dict[str, Any]) -> None:
    """Write a query file atomically: latents [C, L], text_emb [S, D], ``info`` (query_id, caption, timing, ...)."""
    with atomic_path(path) as tmp:
        save_file({"latents": latents.float().cpu().contiguous(), "text_emb": text_emb.cpu().contiguous()},
                  str(tmp), metadata={"info": json.dumps(info)})


def load_query(path: str) -> dict:
    """A query written by ``generate``: latents [C, L], text_emb [S, D] and its info."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"query file not found: {path}; fix: run `musicattr generate` or give a "
                                "training item with --query_item")
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["info"])
        return {"latents": f.get_tensor("latents"), "text_emb": f.get_tensor("text_emb"), **info}


def query_batch(query: str | None = None, query_item: str | None = None, store: str | None = None) -> dict[str, Any]:
    """A batch of one: a generated query file, or a training item of the latent store (its item_id, or
    ``index:N`` / N for its index; see ``LatentStore.resolve``). Every field of the item is kept (collated as
    the store's batches are), so a task reads whatever conditioning its model needs."""
    if (query is None) == (query_item is None):
        raise ValueError("give exactly one of query (a .query.safetensors from `musicattr generate`) "
                         "or query_item (a training item id, with store)")
    if query is not None:
        q = load_query(query)
        item = {**q, "item_id": str(q["query_id"])}
    else:
        from musicattr.data.latent_store import LatentStore

        if store is None:
            raise ValueError("query_item needs store (the latent store holding the item)")
        s = LatentStore(store)
        item = s[s.resolve(query_item)]
    item = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in item.items()
            if v is not None}
    return collate_items([item])


def query_fingerprint(query: str | None, query_item: str | None, store: str | None) -> str:
    """Content fingerprint of the query: its file, or the store's fingerprint and the item's id."""
    from musicattr.data.latent_store import LatentStore
    from musicattr.fingerprint import file_fingerprint

    if query is not None:
        return file_fingerprint(query)
    s = LatentStore(store)
    return f"{s.fingerprint}:{s.items['item_id'].iloc[s.resolve(query_item)]}"


PREPARED_LISTING = "bank_queries.csv"


def listing_file(compare: str | Path, prepared: bool = True) -> Path:
    """The listing of a compare folder's queries: compare's ``queries.csv`` once it has run there, else (with
    ``prepared``) the ``bank_queries.csv`` that ``musicattr benchmark --prepare true`` wrote, if any (the path
    returned may not exist)."""
    compare = Path(compare)
    if prepared and not (compare / "queries.csv").exists() and (compare / PREPARED_LISTING).exists():
        return compare / PREPARED_LISTING
    return compare / "queries.csv"


def compare_listing(compare: str | Path, query_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """The queries of a finished ``musicattr compare`` run: [{query_id, kind, query, query_item}] in queries.csv's
    order (generated and planted: ``generated/<id>.query.safetensors``; training: the store item ``query_item``).
    A folder that ``musicattr benchmark --prepare true`` prepared for compare, which has not run there yet, is
    listed from its ``bank_queries.csv`` (the bank's queries placed in ``generated/``): the peers and the index
    ensemble score them without compare's own tables. ``query_ids`` keeps those queries only. A missing file raises
    FileNotFoundError, a bad listing ValueError."""
    import pandas as pd

    compare = Path(compare)
    listing = listing_file(compare)
    if not listing.exists():
        raise FileNotFoundError(f"{listing} not found: {compare} is no finished `musicattr compare` run; fix: run "
                                "compare first (`make benchmark-scores` for the bank's queries), prepare the bank's "
                                "queries there (`musicattr benchmark --prepare true`) or point --compare at its "
                                "out_dir")
    table = pd.read_csv(listing, dtype={"query_id": str, "query_item": str})
    missing_cols = {"query_id", "kind"} - set(table.columns)
    if missing_cols:
        raise ValueError(f"{listing} lacks the columns {sorted(missing_cols)}; fix: rerun `musicattr compare`")
    if query_ids:
        unknown = sorted(set(query_ids) - set(table["query_id"]))
        if unknown:
            raise ValueError(f"queries {unknown[:5]} are not in {listing}; fix: name query ids of that run")
        table = table[table["query_id"].isin(set(query_ids))]
    out = []
    for r in table.to_dict("records"):
        qid, kind = r["query_id"], r["kind"]
        if kind == "training":
            item = r.get("query_item")
            if not isinstance(item, str) or not item:
                raise ValueError(f"{listing}: training query {qid} names no query_item; fix: rerun `musicattr compare`")
            out.append({"query_id": qid, "kind": kind, "query": None, "query_item": item})
        else:
            path = compare / "generated" / f"{qid}.query.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"{path} not found (query {qid} of {listing}); fix: rerun `musicattr compare` "
                                        "(it writes the query latents to generated/)")
            out.append({"query_id": qid, "kind": kind, "query": str(path), "query_item": None})
    return out
