"""The attribution methods a campaign or the benchmark validates: a method is a named table of scores per query.

Methods come from the registry (:mod:`musicattr.attribution.methods`): a config's ``methods`` lists names
(``unlearning``, ``unlearning-relative``, ``index``, ``all-against-all[aisfx]``, ``random``, a peer's name) or
entries ``{name, table, column, optional}`` that override or add a table (a relative path is under the compare
run, so another compare run beside it is ``../figure1-clap/queries/...``).

A table must score every item of the store once (matched by ``item_id``, in any row order). A method
marked ``optional`` whose table is missing for some query is left out with a log line (e.g. the index
before it is built); any other missing table stops the stage with the file and the fix. The method
``random`` has no table: uniform scores from a seed (its LDS is the chance level, its top-K is leave-K-out's
random-K removal).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from musicattr.attribution.methods import RANDOM, Method, resolve_methods
from musicattr.attribution.scores_table import check_scores_table

log = logging.getLogger(__name__)
__all__ = ["RANDOM", "Method", "parse_methods", "read_scores", "method_scores"]


def parse_methods(specs: list) -> list[Method]:
    """Methods from the config's list (names or {name, table, column, optional}), resolved by the registry."""
    return resolve_methods(specs)


def read_scores(path: Path, column: str, item_ids: list[str]) -> np.ndarray:
    """A method's scores of one query, in the store's order (by item_id)."""
    df = pd.read_parquet(path)
    if column not in df.columns or "item_id" not in df.columns:
        raise KeyError(f"{path} has no column {column!r} (columns: {list(df.columns)}); fix: name the score column "
                       "of this table in the method's `column`, or rerun the stage that writes it (e.g. compare with "
                       "relative: true for relative_score)")
    check_scores_table(df, path, item_ids, columns=["item_id", column])
    s = df.set_index(df["item_id"].astype(str))[column]
    values = s.loc[item_ids].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: {int((~np.isfinite(values)).sum())} scores in {column!r} are not finite; fix: "
                         "rerun the method that wrote it")
    return values


def method_scores(methods: list[Method], root: str | Path, queries: list, item_ids: list[str],
                  random_seed: int = 0, random_per_query: bool = False, fix: str = "run the stage that writes it "
                  "(`musicattr compare` for the compare run's tables)", partial: bool = False) -> dict[str, np.ndarray]:
    """Scores [Q, N] of each available method: row q in the order of ``query_ids``, column i in the store's order.
    ``queries``: query ids or :class:`~musicattr.counterfactual.queries.Query`. ``random``: one seeded uniform
    vector for every query, or with ``random_per_query`` one per query. An optional method missing some queries'
    tables is left out, or with ``partial`` kept with NaN rows for those queries (a peer still scoring a batch)."""
    root = Path(root)
    query_ids = [getattr(q, "query_id", q) for q in queries]
    out = {}
    for m in methods:
        if m.table is None:
            if random_per_query:
                out[m.name] = np.random.default_rng([random_seed, 0x7A4D]).random((len(query_ids), len(item_ids)))
            else:
                from musicattr.counterfactual.subsets import random_scores

                out[m.name] = np.tile(random_scores(len(item_ids), random_seed), (len(query_ids), 1))
            continue
        paths = [m.path(root, q) for q in query_ids]
        missing = [p for p in paths if not p.exists()]
        if missing and m.optional and not (partial and len(missing) < len(paths)):
            log.info("method %s left out: no table %s (optional)", m.name, missing[0])
            continue
        if missing and not m.optional:
            raise FileNotFoundError(f"method {m.name!r}: {missing[0]} not found ({len(missing)} of {len(query_ids)} "
                                    f"queries); fix: {fix}, or mark the method optional: true")
        if missing:
            log.info("method %s: %d of %d queries have no table yet (first %s): NaN rows", m.name, len(missing),
                     len(paths), missing[0])
        out[m.name] = np.stack([read_scores(p, m.column, item_ids) if p.exists() else np.full(len(item_ids), np.nan)
                                for p in paths])
    return out
