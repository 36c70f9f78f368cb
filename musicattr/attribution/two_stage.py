"""The two-stage query (``musicattr query --exact_top M``): the index proposes, exact Eq. 1 decides.

Stage 1, the index (``musicattr.attribution.query``): tau^_i = <P phi_i, P psi> for every item; the candidates C
of a query are its top M by tau^, united with its top M by tau^_i / s_i when relative scores are on
(M <= |C| <= 2M).

Stage 2, exact Eq. 1 on C only, the per-draw scoring of ``musicattr attribute``: over the index's T scoring
draws (its seed and M_L),

    d_ij = L_{t_j}(z_i, theta_unlearned) - L_{t_j}(z_i, theta0),   tau_i = mean_j d_ij,   SE_i = sd_j(d_ij) / sqrt(T)

with L(z_i, theta0) read from the store's baseline cache (``<store>/baselines/``, filled by ``musicattr index``;
computed when it is absent) and theta_unlearned

    an unlearned file of ``musicattr unlearn``:  its tensors, as ``attribute`` loads them;
    a gradient query (generated latent or training item):  theta' = theta0 + P^1/2 psi = theta0 + lr/N (F +
        lambda)^-1 g_q, the Eq. 2 step of ``unlearn`` formed from the psi the index scored (equal to ``unlearn``'s
        weights up to the float rounding of the gradient's sum over draw chunks).

The table (``scores.parquet``, the schema of ``scores_table``, method ``index``) has every item (or the head) with
a boolean column ``exact``. Rank rule: the rows of C come first, ranked by their exact tau (ranks 1..|C|); the
other rows keep their index scores and ranks below them (|C|+1..); ``relative_rank`` likewise, by exact tau / s_i
on C and tau^ / s_i elsewhere (s_i: the index's exact sensitivity).

Cost per query: |C| T forwards at theta_unlearned, plus |C| T at theta0 when the baseline cache is absent
(M T x 2 forwards at most, relative off); as a fraction of an exact pass (N T forwards with the same cache): M / N
(demo: 32 / 192 = 17%; 115k tracks: 32 / 115,000 = 0.028%), on top of the index query itself.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.attribution.cache import baseline_key, cache_path, read_cache

log = logging.getLogger(__name__)
BATCH_SIZE = 16  # items per exact forward batch (the floats depend on it by reduction order only)
RANK_RULE = ("exact rows first, ranked by exact tau (ranks 1..|C|); the other rows below them by index tau^; "
             "relative_rank likewise by tau / s")


def candidates(tau: np.ndarray, m: int, sensitivity: np.ndarray | None = None) -> np.ndarray:
    """Positions (ascending) of the top m of ``tau`` (largest first, ties by position) united, given
    ``sensitivity``, with the top m of tau / s."""
    tau = np.asarray(tau, dtype=np.float64)
    m = min(int(m), len(tau))

    def top(v: np.ndarray) -> np.ndarray:
        return np.lexsort((np.arange(len(v)), -v))[:m]

    pos = top(tau)
    if sensitivity is not None:
        pos = np.union1d(pos, top(tau / np.asarray(sensitivity, dtype=np.float64)))
    return np.unique(pos)


def keep_step(params: Mapping[str, torch.Tensor], precond, psi: Iterable[tuple[str, torch.Tensor]],
              into: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Hand psi on tensor by tensor and keep theta' = theta0 + P^1/2 psi (= theta0 + lr/N P g_q, Eq. 2) in
    ``into``, in each parameter's dtype on the CPU: one copy of the target tensors per gradient query."""
    for name, v in psi:
        p = params[name].detach()
        into[name] = (p.double() + precond.apply_tensor(name, v.to(p.device), 0.5)).to(p.dtype).cpu()
        yield name, v


class ExactScorer:
    """Exact Eq. 1 for chosen items of an opened index (``query.QueryContext``): the index's T, seed and M_L,
    theta_unlearned swapped into the model by assignment, the theta0 side from the store's baseline cache."""

    def __init__(self, ctx, draws_per_forward: int = 16, batch_size: int = BATCH_SIZE):
        prov = ctx.index.provenance
        self.ctx, self.draws_per_forward, self.batch_size = ctx, int(draws_per_forward), int(batch_size)
        self.num_draws, self.seed, self.mask_loss = int(prov["num_draws"]), int(prov["seed"]), bool(prov["mask_loss"])
        key = baseline_key(ctx.common["checkpoint_fingerprint"], ctx.store, ctx.task, ctx.model, self.num_draws,
                           self.seed, self.mask_loss, ctx.device)
        self.cache_file = cache_path(ctx.store.root, "baselines", key)
        self.cache = read_cache(self.cache_file, "baseline_draws")
        if not self.cache:
            log.info("two-stage: no baseline cache %s; L(z_i, theta0) is computed for the candidates (T more "
                     "forwards each; `musicattr index` or `attribute` fills the cache)", self.cache_file)
        self.position = {int(i): p for p, i in enumerate(ctx.store.items["index"])}

    def settings(self) -> dict[str, Any]:
        return {"num_draws": self.num_draws, "seed": self.seed, "mask_loss": self.mask_loss,
                "baseline_cache": str(self.cache_file) if self.cache else None}

    def _losses(self, batch) -> torch.Tensor:
        return self.ctx.task.draw_losses(self.ctx.model, batch, self.seed, self.num_draws, mask=self.mask_loss,
                                         draws_per_forward=self.draws_per_forward).cpu()

    def score(self, indices: Iterable[int], theta: Mapping[str, torch.Tensor]) -> tuple[pd.DataFrame, int]:
        """(rows index, baseline_loss, unlearned_loss, score, score_se, num_draws of the items ``indices`` under
        theta_unlearned ``theta`` (name -> values of the changed tensors), the number of draw forwards run)."""
        from musicattr.data.datamodules import collate_items

        from musicattr.attribution.score import swapped

        ctx, indices = self.ctx, [int(i) for i in indices]
        params = {k: ctx.params[k] for k in theta}
        values = {k: v.to(params[k].device, params[k].dtype) for k, v in theta.items()}
        out, forwards = [], 0
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            batch = collate_items([ctx.store[self.position[i]] for i in chunk])
            batch = {k: (v.to(ctx.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.no_grad():
                with swapped(params, values):
                    unlearned = self._losses(batch)
                forwards += len(chunk) * self.num_draws
                if all(i in self.cache for i in chunk):
                    baseline = torch.tensor(np.stack([self.cache[i] for i in chunk]), dtype=torch.float64)
                else:
                    baseline = self._losses(batch)
                    forwards += len(chunk) * self.num_draws
            d = unlearned - baseline  # the same draws on both sides
            se = (d.std(1, correction=1) / d.shape[1] ** 0.5 if d.shape[1] > 1
                  else torch.full((len(chunk),), float("nan")))
            bl, ul = baseline.mean(1).numpy(), unlearned.mean(1).numpy()
            out.append(pd.DataFrame({"index": chunk, "baseline_loss": bl, "unlearned_loss": ul,
                                     "score": ul.astype(np.float64) - bl, "score_se": se.numpy(),
                                     "num_draws": self.num_draws}))
        return pd.concat(out, ignore_index=True), forwards


def rescore(scorer: ExactScorer, qdir: Path, indices: np.ndarray, theta_of, key: Mapping[str, Any]
            ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The exact rows of one query, kept in ``qdir/exact.parquet`` with their key (``exact.json``): a rerun with
    the same key (query, index, candidates, T, seed, M_L) reuses them instead of scoring again. ``theta_of()``
    gives theta_unlearned (called only when scoring)."""
    key = json.loads(json.dumps({**key, "candidates": [int(i) for i in indices], **scorer.settings()}, default=str))
    rows_file, key_file = qdir / "exact.parquet", qdir / "exact.json"
    t0 = time.perf_counter()
    if rows_file.exists() and key_file.exists() and json.loads(key_file.read_text()).get("key") == key:
        rows, forwards, reused = pd.read_parquet(rows_file), 0, True
    else:
        rows, forwards = scorer.score(indices, theta_of())
        reused = False
        with atomic_path(rows_file) as tmp:
            rows.to_parquet(tmp, index=False)
        atomic_write_json(key_file, {"key": key})
    return rows, {"candidates": len(indices), "forwards": forwards, "reused": reused,
                  "seconds": time.perf_counter() - t0}


def two_stage_table(index, store, positions: np.ndarray, tau: np.ndarray, exact: pd.DataFrame,
                    query_id: str, relative: bool, method: str = "index") -> pd.DataFrame:
    """The scores table of a two-stage query: the index's rows at ``positions`` (in ``index.items``) with scores
    ``tau``, the rows of ``exact`` (by item index) replaced by their exact Eq. 1 values, ``exact`` marking them, and
    ranked by ``RANK_RULE``."""
    from musicattr.attribution.score import ranked_table
    from musicattr.attribution.scores_table import COLUMNS

    items = index.items.iloc[np.asarray(positions)].reset_index(drop=True)
    tau = np.asarray(tau, dtype=np.float64)
    rows = pd.DataFrame({"index": items["index"].astype(int), "baseline_loss": items["baseline_loss"].astype(float),
                         "unlearned_loss": items["baseline_loss"].astype(float) + tau, "score": tau,
                         "score_se": np.full(len(items), np.nan),
                         "num_draws": np.full(len(items), int(index.provenance["num_draws"])),
                         "sensitivity": items["sensitivity"].astype(float)})
    e = exact.set_index(exact["index"].astype(int))
    hit = rows["index"].isin(e.index).to_numpy()
    if hit.sum() != len(e):
        raise ValueError(f"{len(e) - int(hit.sum())} exact rows are not among the table's rows")
    for c in ("baseline_loss", "unlearned_loss", "score", "score_se", "num_draws"):
        rows.loc[hit, c] = e.loc[rows.loc[hit, "index"], c].to_numpy()
    df = ranked_table(store, rows, query_id, relative, method)
    df["exact"] = df["index"].astype(int).isin(e.index).to_numpy()
    df["rank"] = staged_rank(df, "score")
    if relative:
        df["relative_rank"] = staged_rank(df, "relative_score")
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    return df.sort_values("rank", kind="mergesort").reset_index(drop=True)


def staged_rank(df: pd.DataFrame, by: str) -> np.ndarray:
    """Ranks 1..n: the ``exact`` rows first, each group by ``by`` (largest first, ties by index, NaN last)."""
    order = df.assign(_inexact=~df["exact"].astype(bool)).sort_values(
        ["_inexact", by, "index"], ascending=[True, False, True], kind="mergesort", na_position="last").index
    ranks = pd.Series(np.zeros(len(df), dtype=np.int64), index=df.index)
    ranks.loc[order] = np.arange(1, len(df) + 1, dtype=np.int64)
    return ranks.to_numpy()
