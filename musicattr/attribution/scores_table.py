"""One scores-table schema for every attribution method (``scores.parquet`` and its kin).

A method's answer to one query is a table with one row per training item:

    item_id, index, caption, file_name, duration_s, valid_frames    the store's item (``store.items``)
    score        the method's attribution score; larger = more credit (Eq. 1: tau_i = L(z_i, theta') - L(z_i, theta0))
    score_se     its standard error over the random draws (0 for a computed score, NaN when not known)
    rank         1 = largest score; ties by index (a total order)
    baseline_loss, unlearned_loss   the two losses of Eq. 1 (NaN for methods without them)
    method, query_id

and, where the method has them, the optional columns ``num_draws``, ``sensitivity``, ``relative_score``
(score / sensitivity), ``relative_score_se`` and ``relative_rank``. Every writer builds its table with
:func:`scores_table` (or :func:`rank`) and every reader checks it with :func:`check_scores_table`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

ITEM_COLUMNS = ["item_id", "index", "caption", "file_name", "duration_s", "valid_frames"]
COLUMNS = [*ITEM_COLUMNS, "score", "score_se", "rank", "baseline_loss", "unlearned_loss", "method", "query_id"]
OPTIONAL_COLUMNS = ["num_draws", "sensitivity", "relative_score", "relative_score_se", "relative_rank"]
READ_COLUMNS = ["item_id", "index", "score", "rank"]  # what a reader needs at least


class ScoresTableError(ValueError):
    """A scores table that does not follow the schema (the message names the file and the fix)."""


def rank(df: pd.DataFrame, by: str = "score", column: str = "rank") -> pd.Series:
    """Ranks 1..N of ``df[by]`` (1 = largest; ties by ``index``, then row order; NaN last)."""
    order = df.sort_values([by, "index"], ascending=[False, True], kind="mergesort", na_position="last").index
    out = pd.Series(np.zeros(len(df), dtype=np.int64), index=df.index, name=column)
    out.loc[order] = np.arange(1, len(df) + 1, dtype=np.int64)
    return out


def item_frame(items: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    """The item columns of the schema from a store's ``items`` table or a list of item dicts (``index``
    defaults to the position, ``valid_frames`` to <NA>, text columns to '')."""
    if not isinstance(items, pd.DataFrame):
        items = pd.DataFrame([{"index": i, **dict(it)} for i, it in enumerate(items)])
    n = len(items)
    df = pd.DataFrame({
        "item_id": items["item_id"].astype(str).to_numpy() if "item_id" in items else np.arange(n).astype(str),
        "index": items["index"].astype(np.int64).to_numpy() if "index" in items else np.arange(n, dtype=np.int64),
        "caption": items["caption"].fillna("").to_numpy() if "caption" in items else [""] * n,
        "file_name": items["file_name"].fillna("").to_numpy() if "file_name" in items else [""] * n,
        "duration_s": (items["duration_s"].astype(np.float64).to_numpy() if "duration_s" in items
                       else np.full(n, np.nan)),
        "valid_frames": pd.array(items["valid_frames"].tolist() if "valid_frames" in items else [None] * n,
                                 dtype="Int64"),
    })
    return df


def scores_table(items: pd.DataFrame | Sequence[dict], score: Any, method: str, query_id: str | None = None,
                 score_se: Any = None, baseline_loss: Any = None, unlearned_loss: Any = None,
                 extra: dict[str, Any] | None = None, relative: bool = False) -> pd.DataFrame:
    """The schema's table of one query, sorted by rank: ``items`` in the store's order, ``score`` (and the other
    per-item arrays) in the same order. ``score_se`` defaults to NaN (not known), the losses to NaN. With
    ``relative`` (``extra`` holds ``sensitivity``): relative_score = score / sensitivity, its SE and rank."""
    df = item_frame(items)
    n = len(df)

    def column(values, default=np.nan) -> np.ndarray:
        a = np.full(n, default, dtype=np.float64) if values is None else np.asarray(values, dtype=np.float64)
        if a.reshape(-1).shape != (n,):
            raise ValueError(f"{a.size} values for {n} items; fix: give one value per item, in the items' order")
        return a.reshape(-1)

    df["score"] = column(score)
    df["score_se"] = column(score_se)
    df["baseline_loss"] = column(baseline_loss)
    df["unlearned_loss"] = column(unlearned_loss)
    for k, v in (extra or {}).items():
        df[k] = np.asarray(v).reshape(-1) if np.ndim(v) else v
    if relative:
        s = df["sensitivity"].astype(np.float64)
        df["relative_score"] = df["score"] / s
        df["relative_score_se"] = df["score_se"] / s
        df["relative_rank"] = rank(df, "relative_score", "relative_rank")
    df["rank"] = rank(df)
    df["method"] = method
    df["query_id"] = query_id
    ordered = COLUMNS + [c for c in df.columns if c not in COLUMNS]
    return df[ordered].sort_values("rank", kind="mergesort").reset_index(drop=True)


def check_scores_table(df: pd.DataFrame, path: str | Path, item_ids: Sequence[str] | None = None,
                       columns: Sequence[str] = READ_COLUMNS) -> pd.DataFrame:
    """``df`` (read from ``path``) if it has ``columns`` and, given ``item_ids``, scores each of them once."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ScoresTableError(f"{path} lacks the columns {missing} of a scores table (it has {list(df.columns)}); "
                               "fix: rerun the stage that wrote it (tables follow musicattr.attribution.scores_table)")
    if item_ids is not None:
        ids = df["item_id"].astype(str)
        if ids.duplicated().any() or set(ids) != set(map(str, item_ids)):
            raise ScoresTableError(f"{path} does not score every item of the store exactly once ({len(df)} rows, "
                                   f"{len(set(ids) ^ set(map(str, item_ids)))} ids differ); fix: score this store "
                                   "(rerun the method on it)")
    return df


def read_scores_table(path: str | Path, item_ids: Sequence[str] | None = None,
                      columns: Sequence[str] = READ_COLUMNS) -> pd.DataFrame:
    """A scores table from Parquet, checked, sorted by rank."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; fix: run the method's stage for this query")
    df = check_scores_table(pd.read_parquet(path), path, item_ids, columns)
    return df.sort_values("rank", kind="mergesort").reset_index(drop=True)
