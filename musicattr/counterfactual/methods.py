"""The attribution methods a campaign validates: a method is a named table of scores per query.

Each method names a Parquet table per query (``table``, with ``{query_id}`` for the query's id; a relative
path is under the compare run, so another compare run beside it is ``../figure1-clap/queries/...``) and the
column holding its score (``column``, default ``score``), e.g.

    - {name: unlearning, table: "queries/{query_id}/unlearning/scores.parquet"}                 # Eq. 1
    - {name: unlearning-relative, table: "queries/{query_id}/unlearning/scores.parquet", column: relative_score}
    - {name: index, table: "queries/{query_id}/index/scores.parquet", optional: true}
    - {name: random}                                                                            # no table

A table must score every item of the store once (matched by ``item_id``, in any row order). A method
marked ``optional`` whose table is missing for some query is left out with a log line (e.g. the index
before it is built); any other missing table stops the campaign with the file and the fix. The method
``random`` has no table: uniform scores from a seed, the same for every query (its LDS is the chance level,
its top-K is leave-K-out's random-K removal).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from musicattr.counterfactual.queries import Query

log = logging.getLogger(__name__)
RANDOM = "random"


@dataclass(frozen=True)
class Method:
    name: str
    table: str | None = None
    column: str = "score"
    optional: bool = False

    def path(self, compare: Path, query_id: str) -> Path:
        p = Path(self.table.format(query_id=query_id))
        return p if p.is_absolute() else compare / p


def parse_methods(specs: list[dict]) -> list[Method]:
    """Methods from the config's list of {name, table, column, optional}; only ``random`` may have no table."""
    methods = []
    for spec in specs:
        unknown = set(spec) - {"name", "table", "column", "optional"}
        if "name" not in spec or unknown:
            raise ValueError(f"method {spec}: give name, table and optionally column and optional (unknown: "
                             f"{sorted(unknown)})")
        m = Method(str(spec["name"]), spec.get("table"), str(spec.get("column") or "score"),
                   bool(spec.get("optional", False)))
        if m.table is None and m.name != RANDOM:
            raise ValueError(f"method {m.name!r} names no table; fix: give its scores table per query, e.g. "
                             "table: 'queries/{query_id}/unlearning/scores.parquet' (only 'random' has none)")
        methods.append(m)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names repeat in {names}; fix: name each method once")
    return methods


def read_scores(path: Path, column: str, item_ids: list[str]) -> np.ndarray:
    """A method's scores of one query, in the store's order (by item_id)."""
    df = pd.read_parquet(path)
    if column not in df.columns or "item_id" not in df.columns:
        raise KeyError(f"{path} has no column {column!r} (columns: {list(df.columns)}); fix: name the score column "
                       "of this table in the method's `column`, or rerun the stage that writes it (e.g. compare with "
                       "relative: true for relative_score)")
    s = df.set_index(df["item_id"].astype(str))[column]
    if s.index.duplicated().any() or set(s.index) != set(item_ids):
        raise ValueError(f"{path} does not score every item of the store exactly once ({len(s)} rows, "
                         f"{len(set(s.index) ^ set(item_ids))} ids differ); fix: score this store (rerun the method "
                         "on it)")
    values = s.loc[item_ids].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: {int((~np.isfinite(values)).sum())} scores in {column!r} are not finite; fix: "
                         "rerun the method that wrote it")
    return values


def method_scores(methods: list[Method], compare: str | Path, queries: list[Query], item_ids: list[str],
                  random_seed: int = 0) -> dict[str, np.ndarray]:
    """Scores [Q, N] of each available method: row q in the order of ``queries``, column i in the store's order."""
    compare = Path(compare)
    out = {}
    for m in methods:
        if m.table is None:
            from musicattr.counterfactual.subsets import random_scores

            out[m.name] = np.tile(random_scores(len(item_ids), random_seed), (len(queries), 1))
            continue
        missing = [m.path(compare, q.query_id) for q in queries if not m.path(compare, q.query_id).exists()]
        if missing and m.optional:
            log.info("counterfactual: method %s left out: no table %s (optional)", m.name, missing[0])
            continue
        if missing:
            raise FileNotFoundError(f"method {m.name!r}: {missing[0]} not found ({len(missing)} of {len(queries)} "
                                    "queries); fix: run the stage that writes it (`musicattr compare` for the "
                                    "compare run's tables), or mark the method optional: true")
        out[m.name] = np.stack([read_scores(m.path(compare, q.query_id), m.column, item_ids) for q in queries])
    return out
