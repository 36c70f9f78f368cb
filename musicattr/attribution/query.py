"""Queries against the attribution index (``musicattr query``): first-order Eq. 1 for every training item
from one query vector and one product with the index (see ``musicattr.attribution.index``).

    tau^_i = <P phi_i, P psi>,   relative score tau^_i / s_i

with psi, the query's preconditioned unlearning step, from either

    a query (generated file or training item):  psi = lr/N (F + lambda)^-1/2 grad L(z_hat, theta0; M_U)
        over K draws keyed ``unlearn/<id>`` (the gradient of Eq. 2: its cost is one unlearning step), or
    an unlearned file of ``musicattr unlearn``:  psi = (F + lambda)^1/2 (theta_unlearned - theta0)
        (free: <phi_i, psi> = <g_i, theta_unlearned - theta0>, the first order of that file's own Eq. 1).

All queries of a call share one pass over the index shards (memory-mapped and streamed block by block). With
``head`` = m only the exact top-m per query is kept (a running top-m: memory O(block + m Q), never N x Q) and
the table holds those rows; without it every item is scored. Each query gets the
table of exact scoring (``scores.parquet``, method ``index``: score = tau^, unlearned_loss = baseline_loss +
tau^, the first-order prediction), ``run.json`` and ``noise.json`` in ``<out_dir>/<query>/``, so the report,
``compare`` and the dashboards read it like an ``attribute`` result.

With ``exact_top`` = M the query is two-stage (``musicattr.attribution.two_stage``): exact Eq. 1 re-scores each
query's top M candidates, and the table marks those rows ``exact``.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.attribution.index import AttributionIndex, IndexMismatchError
from musicattr.attribution.preconditioner import DiagonalFisher, Preconditioner
from musicattr.attribution.sketch import make_projection
from musicattr.attribution.task import AttributionTask

log = logging.getLogger(__name__)
METHOD = "index"


def project(projection, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """P psi for psi given tensor by tensor (float64 [k], on the CPU)."""
    return project_norm(projection, tensors.items())[0]


def project_norm(projection, tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, float]:
    """(P psi as float64 [k] on the CPU, ||psi||) for psi handed over one (name, tensor) at a time: with a
    generator of tensors psi never exists whole (at 1 B parameters it would be 8 GB in float64)."""
    out = torch.zeros(projection.k, dtype=torch.float64)
    sq = 0
    for name, v in tensors:
        projection.add(out, name, v.cpu())
        sq = sq + v.double().pow(2).sum()
        del v
    return out, float(sq) ** 0.5


def gradient_psi_tensors(task: AttributionTask, model, params, precond: Preconditioner, batch, lr: float,
                         num_items: int, num_draws: int, seed: int, mask: bool, draws_per_forward: int = 16
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """psi = lr/N P^1/2 g_q tensor by tensor (float64), g_q the query's gradient of Eq. 2 (K draws keyed
    unlearn/<id>, M_U), summed over the draws in float32 (one forward's draws: exactly the float64 total; over
    several, a relative rounding of about 1e-7 per chunk, far below the sketch's error). Each tensor of g_q is
    freed once its psi is handed over, so memory holds the float32 gradient and one float64 tensor."""
    from musicattr.attribution.loss import UNLEARN
    from musicattr.attribution.unlearn import loss_gradient

    g = loss_gradient(task, model, params, batch, seed, num_draws, namespace=UNLEARN, mask=mask,
                      draws_per_forward=draws_per_forward, dtype=torch.float32)
    for k in list(g):
        yield k, (lr / num_items) * precond.apply_tensor(k, g.pop(k).double(), 0.5)


def gradient_psi(task: AttributionTask, model, params, precond: Preconditioner, batch, lr: float,
                 num_items: int, num_draws: int, seed: int, mask: bool, draws_per_forward: int = 16
                 ) -> dict[str, torch.Tensor]:
    """psi = lr/N P^1/2 g_q, g_q the query's gradient of Eq. 2 (K draws keyed unlearn/<id>, M_U)."""
    return dict(gradient_psi_tensors(task, model, params, precond, batch, lr, num_items, num_draws, seed, mask,
                                     draws_per_forward))


def unlearned_psi_tensors(theta0: Mapping[str, torch.Tensor], unlearned: Mapping[str, torch.Tensor],
                          precond: Preconditioner) -> Iterator[tuple[str, torch.Tensor]]:
    """psi = P^-1/2 (theta_unlearned - theta0) tensor by tensor (float64, CPU)."""
    for k in unlearned:
        yield k, precond.apply_tensor(k, unlearned[k].double() - theta0[k].detach().cpu().double(), -0.5).cpu()


def unlearned_psi(theta0: Mapping[str, torch.Tensor], unlearned: Mapping[str, torch.Tensor],
                  precond: Preconditioner) -> dict[str, torch.Tensor]:
    """psi = P^-1/2 (theta_unlearned - theta0), so that <phi_i, psi> = <g_i, theta_unlearned - theta0>."""
    return dict(unlearned_psi_tensors(theta0, unlearned, precond))


def check_unlearned(meta: Mapping[str, Any], path: str, index: AttributionIndex) -> None:
    """An unlearned file is scored by the index only if it was unlearned from the index's checkpoint with its
    Fisher, tensors, damping and M_L (then its relative scores are those of ``attribute``, unless the file was
    unlearned with EK-FAC: its scores are still its first-order Eq. 1, its relative score the diagonal s_i's)."""
    prov = index.provenance
    want = {"checkpoint_fingerprint": prov["checkpoint_fingerprint"], "fisher_fingerprint": prov["fisher_fingerprint"],
            "damping": prov["damping"], "mask_loss": prov["mask_loss"]}
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise IndexMismatchError(f"{path} was unlearned with other settings than the index {index.root} was built "
                                 f"with ({', '.join(f'{k}: file {a!r}, index {b!r}' for k, (a, b) in diff.items())}); "
                                 "fix: unlearn with the index's checkpoint, Fisher, damping and strategy, or build an "
                                 "index with the file's")


def folder_names(query_ids: list[str]) -> list[str]:
    """One folder name per query: its id made safe for a path, ``-2``, ``-3`` ... for a repeated id."""
    names, seen = [], {}
    for qid in query_ids:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", qid).strip("_") or "query"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def index_table(index: AttributionIndex, store, tau: np.ndarray, query_id: str, relative: bool,
                positions: np.ndarray | None = None) -> pd.DataFrame:
    """The scoring table of one query from its index scores tau^ (in ``index.items`` order, or of the items at
    ``positions`` only: a head), with the columns of exact scoring; ``score_se`` is NaN: the index keeps no per-draw
    gradients, so its draw noise is not known per item (its projection error is in the query's ``noise.json``)."""
    from musicattr.attribution.score import ranked_table

    items = index.items if positions is None else index.items.iloc[np.asarray(positions)].reset_index(drop=True)
    rows = pd.DataFrame({"index": items["index"].astype(int), "baseline_loss": items["baseline_loss"],
                         "unlearned_loss": items["baseline_loss"] + tau, "score": tau,
                         "score_se": np.full(len(items), np.nan),
                         "num_draws": np.full(len(items), int(index.provenance["num_draws"])),
                         "sensitivity": items["sensitivity"]})
    return ranked_table(store, rows, query_id, relative, METHOD)


class QueryContext:
    """An index opened for queries: its checks passed, theta0, the preconditioner and the projection ready.

    ``open_query`` builds it; ``from_query`` / ``from_unlearned`` give a query's psi (tensor by tensor) and its
    record; ``scores`` the index scores of several psi at once."""

    def __init__(self, index: AttributionIndex, store, task: AttributionTask, model, params,
                 precond: Preconditioner, projection, num_items: int, mask_unlearn: bool, common: dict[str, Any],
                 device: str):
        self.index, self.store, self.task, self.model, self.params = index, store, task, model, params
        self.precond, self.projection, self.num_items = precond, projection, num_items
        self.mask_unlearn, self.common, self.device = mask_unlearn, common, device

    def _gradient(self, query, query_item, lr, num_draws, seed, strategy, draws_per_forward):
        from musicattr.data.queries import query_batch, query_fingerprint

        batch = query_batch(query, query_item, str(self.store.root))
        batch = {key: (v.to(self.device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        psi = gradient_psi_tensors(self.task, self.model, self.params, self.precond, batch, lr, self.num_items,
                                   num_draws, seed, self.mask_unlearn, draws_per_forward)
        qid = batch["item_id"][0]
        meta = {**self.common, "query_id": qid, "query": query, "query_item": query_item,
                "query_fingerprint": query_fingerprint(query, query_item, str(self.store.root)), "lr": lr,
                "steps": 1, "num_draws": num_draws, "strategy": strategy, "mask_unlearn": self.mask_unlearn,
                "seed": seed, "task": self.task.identity()}
        return psi, {"query_id": qid, "source": "gradient", "unlearned": meta}

    def from_query(self, query: str | None = None, query_item: str | None = None, *, lr: float, num_draws: int,
                   seed: int, strategy: str, draws_per_forward: int = 16) -> tuple[dict[str, torch.Tensor], dict]:
        """psi = lr/N (F + lambda)^-1/2 g_q of a generated query file or a training item."""
        t0 = time.perf_counter()
        psi, info = self._gradient(query, query_item, lr, num_draws, seed, strategy, draws_per_forward)
        psi = dict(psi)
        return psi, {**info, "seconds": time.perf_counter() - t0}

    def projected_query(self, query: str | None = None, query_item: str | None = None, *, lr: float,
                        num_draws: int, seed: int, strategy: str, draws_per_forward: int = 16,
                        step: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, float, dict]:
        """(P psi, ||psi||, record) of ``from_query``'s psi, projected tensor by tensor: psi is never held whole.
        ``step``: a dict that receives theta' = theta0 + P^1/2 psi, the Eq. 2 step (``two_stage.keep_step``)."""
        t0 = time.perf_counter()
        psi, info = self._gradient(query, query_item, lr, num_draws, seed, strategy, draws_per_forward)
        if step is not None:
            from musicattr.attribution.two_stage import keep_step

            psi = keep_step(self.params, self.precond, psi, step)
        p, norm = project_norm(self.projection, psi)
        return p, norm, {**info, "seconds": time.perf_counter() - t0}

    def _unlearned(self, path: str):
        from musicattr.attribution.unlearn import load_unlearned
        from musicattr.fingerprint import file_fingerprint

        tensors, meta = load_unlearned(path)
        check_unlearned(meta, path, self.index)
        outside = sorted(set(tensors) - set(self.params))
        if outside:
            raise IndexMismatchError(f"{path} changes tensors the index does not hold ({outside[:3]}...); fix: build "
                                     "the index with the unlearning target (--model.target)")
        psi = unlearned_psi_tensors({n: p.detach() for n, p in self.params.items()}, tensors, self.precond)
        return psi, {"query_id": meta["query_id"], "source": "unlearned", "unlearned": meta,
                     "unlearned_fingerprint": file_fingerprint(path)}

    def from_unlearned(self, path: str) -> tuple[dict[str, torch.Tensor], dict]:
        """psi = (F + lambda)^1/2 (theta_unlearned - theta0) of an unlearned file of ``musicattr unlearn``."""
        t0 = time.perf_counter()
        psi, info = self._unlearned(path)
        psi = dict(psi)
        return psi, {**info, "seconds": time.perf_counter() - t0}

    def projected_unlearned(self, path: str) -> tuple[torch.Tensor, float, dict]:
        """(P psi, ||psi||, record) of ``from_unlearned``'s psi, projected tensor by tensor."""
        t0 = time.perf_counter()
        psi, info = self._unlearned(path)
        p, norm = project_norm(self.projection, psi)
        return p, norm, {**info, "seconds": time.perf_counter() - t0}

    def scores(self, psis: list[Mapping[str, torch.Tensor]]) -> np.ndarray:
        """tau^ [N, Q] (rows in ``index.items`` order) of several psi: one pass over the index."""
        return self.index.scores(torch.stack([project(self.projection, psi) for psi in psis], 1))

    def heads(self, psis: list[Mapping[str, torch.Tensor]], m: int,
              relative: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per psi, (positions, tau^) of the union of its exact top-m by tau^ and, with ``relative``, by tau^_i / s_i:
        one streamed pass, never the N x Q table."""
        return head_scores(self.index, torch.stack([project(self.projection, psi) for psi in psis], 1), m, relative)


def head_scores(index: AttributionIndex, psi: torch.Tensor, m: int, relative: bool,
                keep: list[np.ndarray] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column of psi [k, Q]: (positions in ``index.items``, tau^) of the exact top-m by tau^ united with the
    top-m by tau^ / s (``relative``) and with the positions ``keep[c]`` (e.g. the similarity proposer's); one pass
    with a running top-m per order (``index_store.TopK``)."""
    from musicattr.attribution.index_store import TopK

    q = psi.shape[1]
    by_score, by_rel = TopK(min(m, index.num_items), q), TopK(min(m, index.num_items), q)
    sens = index.items["sensitivity"].to_numpy(dtype=np.float64)
    kept: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(q)]
    for pos, tau in index.blocks(psi):
        by_score.add(pos, tau)
        if relative:
            by_rel.add(pos, tau / sens[pos, None], tau)
        for c in range(q if keep is not None else 0):
            hit = np.isin(pos, keep[c])
            if hit.any():
                kept[c].append((pos[hit], tau[hit, c]))
    heads = []
    (ps, _, ts), (pr, _, tr) = by_score.result(), by_rel.result()
    for c in range(q):
        pos = np.concatenate([ps[:, c], pr[:, c], *[p for p, _ in kept[c]]])
        tau = np.concatenate([ts[:, c], tr[:, c], *[t for _, t in kept[c]]])
        pos, first = np.unique(pos, return_index=True)
        heads.append((pos, tau[first]))
    return heads


def open_query(index: str, checkpoint: str, fisher: str, store: str | None = None, strategy: str = "mixed",
               mask_unlearn: bool | None = None, target: str | None = None, damping: float | None = None,
               score_draws: int | None = None, score_seed: int | None = None, k: int | None = None,
               device: str = "cpu", task: AttributionTask | None = None) -> QueryContext:
    """Open ``index`` for queries with theta0 ``checkpoint`` and its ``fisher``; refuse it if it was built from
    another checkpoint, Fisher or store, or with another target, damping, T (score_draws), seed, M_L or k than
    the ones given (None: the index's)."""
    from musicattr.attribution.masks import resolve_masks
    from musicattr.attribution.task import load_theta
    from musicattr.data.latent_store import LatentStore
    from musicattr.fingerprint import file_fingerprint

    idx = AttributionIndex(index)
    prov = idx.provenance
    s = LatentStore(store or prov["store"])
    task, model = load_theta(task, checkpoint)
    params = task.select_parameters(model, target or prov["target"])
    mu, ml = resolve_masks(strategy, mask_unlearn=mask_unlearn)
    ckpt_fp, fisher_fp = file_fingerprint(checkpoint), file_fingerprint(fisher)
    idx.check({"checkpoint_fingerprint": ckpt_fp, "fisher_fingerprint": fisher_fp, "store_fingerprint": s.fingerprint,
               **task.identity(), "tensors": sorted(params), "damping": damping, "num_draws": score_draws,
               "seed": score_seed, "mask_loss": ml, "k": k})
    precond = DiagonalFisher.load(fisher, params, prov["damping"], ckpt_fp)
    n_items = precond.provenance()["num_items"]
    projection = make_projection(prov["projection"], {n: p.numel() for n, p in params.items()}, prov["k"],
                                 prov["projection_seed"])
    model.to(device)
    common = {"checkpoint": checkpoint, "checkpoint_fingerprint": ckpt_fp, "fisher": fisher,
              "fisher_fingerprint": fisher_fp, "num_items": n_items, "target": prov["target"],
              "damping": prov["damping"], "mask_loss": ml}
    return QueryContext(idx, s, task, model, params, precond, projection, n_items, mu, common, device)


def run_query(index: str, checkpoint: str, fisher: str, out_dir: str, queries: list[str] | None = None,
              query_items: list[str] | None = None, unlearned: list[str] | None = None, store: str | None = None,
              lr: float = 1e-6, num_draws: int = 256, strategy: str = "mixed", mask_unlearn: bool | None = None,
              seed: int = 0, target: str | None = None, damping: float | None = None,
              score_draws: int | None = None, score_seed: int | None = None, k: int | None = None,
              relative: bool = True, top_k: int = 10, draws_per_forward: int = 16, device: str = "cpu",
              head: int | None = None, exact_top: int | None = None, similar_top: int | None = None,
              similarity_encoder: str = "aisfx", similarity_checkpoint: str | None = None,
              task: AttributionTask | None = None) -> list[dict]:
    """Score every training item for each query with the index; write ``<out_dir>/<query>/scores.parquet``.

    Args:
        index: the folder of ``musicattr index``.
        checkpoint, fisher: theta0 and its Fisher (the index's: checked by fingerprint).
        queries / query_items / unlearned: generated query files, training items (id, or ``index:N``) and
            unlearned files of ``musicattr unlearn``; any mix, all answered in one pass over the index.
        lr, num_draws, strategy, mask_unlearn, seed: Eq. 2 for the query gradient (lr, K, M_U, the draws' seed);
            N is the Fisher's. The strategy's M_L must be the index's.
        target, damping, score_draws, score_seed, k: what the index must have been built with (T = score_draws
            and score_seed are the scoring draws); None takes the index's. Another value is refused.
        relative: also the relative score tau^_i / s_i (s_i exact, stored in the index) and its rank.
        head: None scores every item (the full table); m writes only the exact top-m by tau^ (and by tau^ / s
            with ``relative``) per query, from one streamed pass that never holds the N x Q table; ranks up to m
            are then the global ranks.
        exact_top: None (the index alone), or M: the two-stage query (``musicattr.attribution.two_stage``): exact
            Eq. 1 (the index's T, seed and M_L; baselines from the store's cache) re-scores each query's top M by tau^
            (and by tau^ / s with ``relative``); those rows, marked ``exact``, rank first by their exact score, the
            others below them by tau^. With ``head`` m the table holds the top max(m, M).
        similar_top: None, or M_s: the exact stage also re-scores each query's top M_s training tracks by
            all-against-all audio similarity (``similar_candidates``: compare's table beside the unlearned file, or
            the query's audio embedded with ``similarity_encoder`` / ``similarity_checkpoint``); needs exact_top.
    """
    from musicattr.attribution.score import log_top

    queries, query_items, unlearned = list(queries or []), list(query_items or []), list(unlearned or [])
    if not (queries or query_items or unlearned):
        raise ValueError("no query given; fix: pass --queries (generated .query.safetensors files), --query_items "
                         "(training item ids) or --unlearned (files of `musicattr unlearn`)")
    if head is not None and int(head) < 1:
        raise ValueError(f"head = {head}: choose m >= 1 (the top-m per query), or null for every item")
    if exact_top is not None and int(exact_top) < 1:
        raise ValueError(f"exact_top = {exact_top}: choose M >= 1 (exact Eq. 1 for the index's top M per query), "
                         "or null for the index alone")
    if similar_top is not None and (exact_top is None or int(similar_top) < 1):
        raise ValueError(f"similar_top = {similar_top} with exact_top = {exact_top}: the similarity proposer adds "
                         "candidates to the exact stage; fix: set exact_top M >= 1 and similar_top >= 1, or "
                         "similar_top null")
    ctx = open_query(index, checkpoint, fisher, store, strategy, mask_unlearn, target, damping, score_draws,
                     score_seed, k, device, task)
    gradient = {"lr": lr, "num_draws": num_draws, "seed": seed, "strategy": strategy,
                "draws_per_forward": draws_per_forward}
    two = exact_top is not None
    # theta_unlearned of each query for the exact stage: the Eq. 2 step kept while psi is formed, or the file
    thetas = [{} if two else None for _ in [*queries, *query_items]] + list(unlearned)
    answers = ([ctx.projected_query(query=q, step=t, **gradient) for q, t in zip(queries, thetas)]
               + [ctx.projected_query(query_item=q, step=t, **gradient)
                  for q, t in zip(query_items, thetas[len(queries):])]
               + [ctx.projected_unlearned(path) for path in unlearned])  # (P psi, ||psi||, record) each
    proposed = None if similar_top is None else similar_positions(
        ctx, answers, [None] * (len(answers) - len(unlearned)) + unlearned, int(similar_top), similarity_encoder,
        similarity_checkpoint)
    t0 = time.perf_counter()
    projected = torch.stack([p for p, _, _ in answers], 1)
    if head is None:
        tau, heads = ctx.index.scores(projected), None
    else:
        tau, heads = None, head_scores(ctx.index, projected, max(int(head), int(exact_top or 0)), relative,
                                       None if proposed is None else [p for p, _ in proposed])
    lookup = time.perf_counter() - t0
    idx, prov = ctx.index, ctx.index.provenance
    log.info("query: %d queries against %d items x k = %d in %.3f s (one pass over the index)",
             len(answers), idx.num_items, idx.k, lookup)
    out, summary = Path(out_dir), []
    scorer = None
    if two:
        from musicattr.attribution.two_stage import ExactScorer

        scorer = ExactScorer(ctx, draws_per_forward)
    for q, ((_, norm, info), name) in enumerate(zip(answers, folder_names([i["query_id"] for _, _, i in answers]))):
        qdir = out / name
        exact = None
        if two:
            df, exact = _two_stage(ctx, scorer, qdir, info, thetas[q], tau[:, q] if heads is None else heads[q],
                                   int(exact_top), relative, None if proposed is None else proposed[q])
            thetas[q] = None  # the Eq. 2 step of a gradient query is no longer needed
        elif heads is None:
            df = index_table(idx, ctx.store, tau[:, q], info["query_id"], relative)
        else:
            df = index_table(idx, ctx.store, heads[q][1], info["query_id"], relative, positions=heads[q][0])
        with atomic_path(qdir / "scores.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        # the projection's error of tau^_i is about s_i ||psi|| sqrt(2 / k) (sketch.py); its median, for reading
        sd = float(np.median(idx.items["sensitivity"])) * norm * (2 / idx.k) ** 0.5
        atomic_write_json(qdir / "noise.json", {"float_error": None, "projection_error": sd,
                                                "median_abs_score": None if tau is None
                                                else float(np.median(np.abs(tau[:, q]))), "head": head,
                                                **({} if exact is None else {
                                                    "exact_rows": int(df["exact"].sum()),
                                                    "median_exact_score_se": float(
                                                        df.loc[df["exact"], "score_se"].median())})})
        atomic_write_json(qdir / "run.json", {
            "method": METHOD, "index": str(idx.root), "index_provenance": prov,
            "store": str(ctx.store.root.resolve()), "checkpoint": ctx.common["checkpoint"],
            "checkpoint_fingerprint": ctx.common["checkpoint_fingerprint"], "num_draws": prov["num_draws"],
            "seed": prov["seed"], "mask_loss": prov["mask_loss"], "relative": relative, "query_source": info["source"],
            "unlearned": info["unlearned"], "unlearned_fingerprint": info.get("unlearned_fingerprint"),
            "query_seconds": info["seconds"], "lookup_seconds": lookup, "head": head, "exact_top": exact_top,
            "similar_top": similar_top,
            "two_stage": exact})
        log_top(df, top_k)
        summary.append({"query_id": info["query_id"], "source": info["source"], "folder": str(qdir),
                        "query_seconds": info["seconds"], "lookup_seconds": lookup,
                        **({} if exact is None else {"exact_seconds": exact["seconds"]})})
    atomic_write_json(out / "queries.json", summary)
    return summary


def similar_positions(ctx: QueryContext, answers, unlearned: list[str | None], m: int, encoder: str,
                      checkpoint: str | None) -> list[tuple[np.ndarray, str]]:
    """Per query: (positions in ``index.items`` of its top m training tracks by all-against-all similarity, where
    the similarity came from) -- the two-stage query's similarity proposer (``similar_candidates``)."""
    from musicattr.attribution.similar_candidates import query_similarity, top_by_similarity

    position = {int(i): p for p, i in enumerate(ctx.index.items["index"])}
    out = []
    for (_, _, info), path in zip(answers, unlearned):
        sim, source = query_similarity(ctx.store, info["unlearned"], path, encoder, checkpoint)
        out.append((np.array(sorted(position[i] for i in top_by_similarity(sim, m)), dtype=np.int64), source))
        log.info("two-stage: %s: %d similarity candidates from %s", info["query_id"], len(out[-1][0]), source)
    return out


def _two_stage(ctx: QueryContext, scorer, qdir: Path, info: dict, theta, scored, m: int, relative: bool,
               proposed: tuple[np.ndarray, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """One query's two-stage table and its record: the candidates from its index scores (``scored``: tau^ of every
    item, or the head's (positions, tau^)) and ``proposed`` (positions of the similarity proposer, and its source),
    exact Eq. 1 on them (``theta``: the Eq. 2 step, or an unlearned file)."""
    from musicattr.attribution.two_stage import RANK_RULE, candidates, rescore, two_stage_table

    idx = ctx.index
    positions, tau = (np.arange(idx.num_items), scored) if isinstance(scored, np.ndarray) else scored
    sens = idx.items["sensitivity"].to_numpy(dtype=np.float64)[positions] if relative else None
    chosen = positions[candidates(tau, m, sens)]
    similar = {}
    if proposed is not None:
        added = np.setdiff1d(proposed[0], chosen)
        chosen = np.union1d(chosen, proposed[0])
        similar = {"similar_top": int(len(proposed[0])), "similar_added": int(len(added)),
                   "similarity_source": proposed[1]}
    indices = idx.items["index"].to_numpy()[chosen]
    key = {"index": {k: v for k, v in idx.provenance.items() if k != "tensors"}, "query": info["unlearned"],
           "unlearned_fingerprint": info.get("unlearned_fingerprint")}
    if isinstance(theta, str):
        from musicattr.attribution.unlearn import load_unlearned

        def theta_of():
            return load_unlearned(theta)[0]
        source = f"unlearned file {theta}"
    else:
        def theta_of():
            return theta
        source = "theta0 + P^1/2 psi (the Eq. 2 step of the query gradient)"
    rows, record = rescore(scorer, qdir, indices, theta_of, key)
    df = two_stage_table(idx, ctx.store, positions, tau, rows, info["query_id"], relative, METHOD)
    log.info("two-stage: %s: exact Eq. 1 for %d candidates (top %d%s), T = %d, seed %d, %.2f s%s", info["query_id"],
             len(indices), m, " by tau^ and by tau^ / s" if relative else "", scorer.num_draws, scorer.seed,
             record["seconds"], " (reused)" if record["reused"] else "")
    return df, {"exact_top": m, **similar, **record, **scorer.settings(), "theta_unlearned": source,
                "rank_rule": RANK_RULE}
