"""Ensemble scores: one query's attribution scores averaged over several models, as TRAK averages over its models.

With members m = 1..M (independent training seeds of the same recipe, or checkpoints along one fit), each giving the
query's score of every training item i at its own parameters theta_m (here: the index's first-order Eq. 1, with the
member's own Fisher F_m and sketch P),

    tau^_m(q, i) = < P (F_m + lambda_m)^-1/2 g_i(theta_m),  P lr/N (F_m + lambda_m)^-1/2 g_q(theta_m) >,

the ensemble score is the plain mean of the raw scores,

    tau_ens(q, i) = (1/M) sum_m tau^_m(q, i),

with no normalisation per member (TRAK averages raw scores too): a member whose scores are larger on the whole
weighs more. ``member_sd`` is the spread over the members, sd_m tau^_m(q, i) (ddof 1; 0 for one member): the model
noise that the mean reduces, not a draw error, so ``score_se`` stays NaN (not known).

Members are matched by ``item_id``, never by row order; every member must score every item of the store once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from musicattr.attribution.scores_table import ScoresTableError, check_scores_table, scores_table

METHOD = "index-ensemble"


class EnsembleError(ValueError):
    """A member, or a member's file, that the ensemble cannot use (the message names the file and the fix)."""


def ensemble_mean(member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean over members, sd over members) of ``member_scores`` [M, N] (raw scores, no normalisation)."""
    s = np.asarray(member_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1:
        raise ValueError(f"member scores of shape {s.shape}; fix: give [members, items] with at least one member")
    sd = s.std(axis=0, ddof=1) if s.shape[0] > 1 else np.zeros(s.shape[1])
    return s.mean(axis=0), sd


def read_member_scores(paths: Sequence[str | Path], item_ids: Sequence[str], column: str = "score") -> np.ndarray:
    """Each member table's ``column`` in the order of ``item_ids`` ([M, N]); a missing or malformed table is an
    ``EnsembleError`` naming the file and the fix."""
    ids = [str(i) for i in item_ids]
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise EnsembleError(f"member table {p} not found; fix: run `musicattr ensemble` (it scores every member's "
                                "queries, resuming where it stopped), or drop that member from the config")
        try:
            df = check_scores_table(pd.read_parquet(p), p, ids, columns=["item_id", column])
        except ScoresTableError as e:
            raise EnsembleError(f"member table {p}: {e}") from e
        rows.append(df.set_index(df["item_id"].astype(str))[column].reindex(ids).to_numpy(dtype=np.float64))
    return np.stack(rows) if rows else np.zeros((0, len(ids)))


def ensemble_table(items: pd.DataFrame, member_scores: np.ndarray, query_id: str, members: Sequence[str],
                   method: str = METHOD) -> pd.DataFrame:
    """The standard scores table of the ensemble for one query: ``member_scores`` [M, N] in the order of ``items``
    (the store's), score = their mean, ``member_sd`` their spread, one column ``score[<member>]`` per member."""
    member_scores = np.asarray(member_scores, dtype=np.float64)
    if member_scores.shape[0] != len(members):
        raise ValueError(f"{member_scores.shape[0]} score rows for {len(members)} member names; fix: one name each")
    mean, sd = ensemble_mean(member_scores)
    extra = {"member_sd": sd, "members": len(members),
             **{f"score[{name}]": member_scores[m] for m, name in enumerate(members)}}
    return scores_table(items, mean, method, query_id, extra=extra)


def write_ensemble_table(path: str | Path, items: pd.DataFrame, member_paths: Sequence[str | Path], query_id: str,
                         members: Sequence[str], method: str = METHOD) -> pd.DataFrame:
    """Read the members' tables of one query, average them and write the ensemble's table at ``path``."""
    from musicattr.atomic import atomic_path

    scores = read_member_scores(member_paths, list(items["item_id"].astype(str)))
    df = ensemble_table(items, scores, query_id, members, method)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        df.to_parquet(tmp, index=False)
    return df
