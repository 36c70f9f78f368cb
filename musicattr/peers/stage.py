"""``musicattr peers``: the peers' scores tables for every query of a ``musicattr compare`` run.

For each query of ``<compare>/queries.csv`` (generated and planted: ``generated/<id>.query.safetensors``; training
items: their store item) and each peer, the standard scores table at ``<out_dir>/queries/<id>/<peer>/scores.parquet``
(``out_dir`` defaults to the compare run, where ``musicattr benchmark`` and ``counterfactual`` look for them):

    ekfac             EK-FAC influence through kronfluence (``kronfluence_peer``)
    trak, dtrak       TRAK and D-TRAK through traker, CPU projector (``trak_peer``)
    unlearning-ekfac  "AbU+": Eq. 2 with the EK-FAC preconditioner (the fitted factors on the linear layers, the
                      diagonal Fisher on the target's other tensors), then Eq. 1 over the store

Resumable: a query whose table exists with the same settings (``settings.json`` beside it) is skipped; EK-FAC factors
are reused when fitted with the same settings. ``costs.json`` in ``<out_dir>/peers/`` records each peer's seconds per
model (what is paid once: factors, training features; when a run reused them, the seconds their making took, with
``per_model_reused``) and per query (EK-FAC's: kronfluence's pairwise scoring passes the training gradients once
per run, so its per-query seconds hold that pass shared over the run's queries).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musicattr.atomic import atomic_write_json
from musicattr.attribution.loss import UNLEARN
from musicattr.fingerprint import items_fingerprint, settings_key
from musicattr.peers.common import compare_queries, is_done, linear_layers, store_batches, write_table

log = logging.getLogger(__name__)
PEERS = ("ekfac", "trak", "dtrak", "unlearning-ekfac")


def _record_cost(out_dir: Path, peer: str, per_model_s: float | None, per_query_s: float, queries: int,
                 reused: bool = False) -> None:
    """costs.json's entry for ``peer``: per_model_s is what the once-paid part cost when made (None: not recorded),
    ``reused`` whether this run reused it rather than paying it."""
    path = out_dir / "peers" / "costs.json"
    costs = json.loads(path.read_text()) if path.exists() else {}
    costs[peer] = {"seconds_per_model": None if per_model_s is None else round(per_model_s, 1),
                   "per_model_reused": reused, "seconds_per_query": round(per_query_s, 2), "queries": queries,
                   "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, costs)


def run_peers(compare: str, checkpoint: str, store: str, fisher: str | None = None, out_dir: str | None = None,
              work_dir: str | None = None, peers: list[str] | None = None, queries: list[str] | None = None,
              task: Any = None, target: str = "all", seed: int = 0, train_draws: int = 32, query_draws: int = 128,
              query_mask: bool = True, batch_size: int = 16, fit_draws: int = 8, fisher_kind: str = "empirical",
              ekfac_damping: float | None = None, proj_dim: int = 2048, proj_seed: int = 0, trak_damping: float = 1e-3,
              query_batch_size: int = 4, unlearn_lr: float = 1e-6, unlearn_steps: int = 1, unlearn_damping: float = 1e-3,
              score_draws: int = 32, fit_seed: int | None = None, threads: int | None = None) -> dict:
    """Write every peer's scores table for the queries of a compare run.

    Args:
        compare: the out_dir of ``musicattr compare`` (queries.csv, generated/*.query.safetensors), or a batch
            folder ``musicattr benchmark --prepare true`` prepared for it (bank_queries.csv).
        checkpoint: theta0 (the model compare scored); store: its latent store; fisher: its diagonal Fisher (the
            fallback of unlearning-ekfac on tensors outside linear layers; without it unlearning-ekfac changes the
            linear layers only).
        out_dir: where the tables go (default: ``compare``); work_dir: factors and features (default
            ``<out_dir>/peers``).
        peers: any of ekfac, trak, dtrak, unlearning-ekfac (default: all); queries: query ids (default: all).
        task: the attribution task (class path or instance; default the SAT DiT); target: its parameter group.
        seed: the draw seed of every loss (training items' draws keyed by id, queries' by ``unlearn/<id>``).
        train_draws: T, draws per training item of the gradients (ekfac, trak, dtrak); query_draws: K, of the query
            (Eq. 2's draws); query_mask: M_U on the query's loss; batch_size: training items per batch.
        fit_draws: (item, draw) examples per item for the EK-FAC factors (the Fisher's draws); fisher_kind:
            'empirical' or 'sampled'; ekfac_damping: kronfluence's damping factor (None: its heuristic, 0.1 x mean
            eigenvalue per layer).
        proj_dim, proj_seed, trak_damping: TRAK's projection (traker's BasicProjector), its seed, lambda_reg =
            damping x mean eigenvalue of Phi^T Phi.
        query_batch_size: queries per batch (TRAK's vmapped batch; EK-FAC's query-gradient batch).
        unlearn_lr, unlearn_steps, unlearn_damping, score_draws: Eq. 2 (lr, steps, lambda = damping x mean
            eigenvalue, as the diagonal Fisher's) and Eq. 1's T for unlearning-ekfac (K = query_draws).
        fit_seed: the draw seed of the EK-FAC factors (None: ``seed``); a rerun with another ``seed`` and the same
            fit_seed reuses the fitted factors (the curvature is fitted once per model) and redraws the rest.
        threads: torch threads (default: leave as set, e.g. by OMP_NUM_THREADS).
    """
    from musicattr.attribution.task import load_theta, resolve_task
    from musicattr.data.latent_store import LatentStore
    from musicattr.fingerprint import file_fingerprint

    if threads:
        torch.set_num_threads(threads)
    peers = list(peers or PEERS)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; fix: choose from {list(PEERS)}")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found; fix: give the model the compare run scored")
    out = Path(out_dir or compare)
    work = Path(work_dir) if work_dir else out / "peers"
    s = LatentStore(store)
    items = s.items
    qs = compare_queries(compare, store, queries)
    task = resolve_task(task)
    ckpt_fp = file_fingerprint(checkpoint)
    base = {"checkpoint_fingerprint": ckpt_fp, "store_fingerprint": s.fingerprint, "task": task.identity(),
            "target": target, "seed": seed}
    train = store_batches(s)
    result = {}
    log.info("peers: %d queries of %s, %d training items, peers %s -> %s", len(qs), compare, len(train), peers, out)

    factors = None
    if "ekfac" in peers or "unlearning-ekfac" in peers:
        from musicattr.peers.kronfluence_peer import fit_factors, make_analyzer, pairwise_scores

        _, model = load_theta(task, checkpoint)
        layers = linear_layers(task, model, target)
        analyzer, _ = make_analyzer(task, model, list(layers), work / "kronfluence", seed=seed, train_draws=train_draws,
                                    query_draws=query_draws, query_mask=query_mask, fit_seed=fit_seed)
        fit_prov = {**base, **({} if fit_seed is None else {"seed": fit_seed}), "batch_size": batch_size}
        fname, factors, fit_s, fit_reused = fit_factors(analyzer, train, layers, fit_draws, batch_size, fisher_kind,
                                                        fit_prov)
        settings = {**base, "peer": "ekfac", "factors": fname, "fit_draws": fit_draws, "fisher_kind": fisher_kind,
                    "damping": ekfac_damping, "train_draws": train_draws, "query_draws": query_draws,
                    "query_mask": query_mask}
        todo = [q for q in qs if not is_done(out, q["query_id"], "ekfac", settings)]
        if "ekfac" in peers and todo:
            log.info("peers/ekfac: scoring %d queries (%d already done)", len(todo), len(qs) - len(todo))
            t0 = time.time()
            key = settings_key({**settings, "queries": [q["query_id"] for q in todo]})
            sc = pairwise_scores(analyzer, fname, [q["batch"] for q in todo], train, batch_size, ekfac_damping, key,
                                 query_batch_size)
            for q, row in zip(todo, sc):
                write_table(out, q["query_id"], "ekfac", items, row, settings, score_se=np.zeros(len(row)))
            dt = time.time() - t0
            log.info("peers/ekfac: %d tables in %.0f s", len(todo), dt)
            _record_cost(out, "ekfac", fit_s, dt / len(todo), len(todo), fit_reused)
        result["ekfac"] = len(todo)
        del analyzer, model

    for kind in ("trak", "dtrak"):
        if kind not in peers:
            continue
        from musicattr.peers.trak_peer import trak_scores

        settings = {**base, "peer": kind, "proj_dim": proj_dim, "proj_seed": proj_seed, "damping": trak_damping,
                    "train_draws": train_draws, "query_draws": query_draws, "query_mask": query_mask}
        todo = [q for q in qs if not is_done(out, q["query_id"], kind, settings)]
        if todo:
            log.info("peers/%s: %d queries (%d already done)", kind, len(todo), len(qs) - len(todo))
            _, model = load_theta(task, checkpoint)
            sc, cost = trak_scores(task, model, kind, train, [q["batch"] for q in todo], work / kind, target, proj_dim,
                                   seed, proj_seed, train_draws, query_draws, query_mask, batch_size, query_batch_size,
                                   damping=trak_damping, features_key={
                                       **{k: v for k, v in settings.items() if k not in ("query_draws", "query_mask")},
                                       "item_ids": items_fingerprint(list(map(str, items["item_id"])))})
            for q, row in zip(todo, sc):
                write_table(out, q["query_id"], kind, items, row, settings, score_se=np.zeros(len(row)))
            log.info("peers/%s: %d tables (featurize %s s%s, score %.0f s)", kind, len(todo),
                     "?" if cost["featurize_s"] is None else f"{cost['featurize_s']:.0f}",
                     ", reused" if cost["features_reused"] else "", cost["score_s"])
            _record_cost(out, kind, cost["featurize_s"], cost["score_s"] / len(todo), len(todo),
                         cost["features_reused"])
        result[kind] = len(todo)

    if "unlearning-ekfac" in peers:
        result["unlearning-ekfac"] = _unlearning_ekfac(task, checkpoint, fisher, factors, qs, train, items, out, work,
                                                       base, target, seed, query_draws, query_mask, unlearn_lr,
                                                       unlearn_steps, unlearn_damping, score_draws, batch_size, ckpt_fp)
    return result


def _item_draw_losses(task, model, train, seed: int, draws: int, batch_size: int) -> torch.Tensor:
    """L_{t_j}(z_i) [N, T] over the store (Eq. 1's draws: bare ids, M_L off), float64."""
    from musicattr.peers.common import concat_batches

    out = []
    with torch.no_grad():
        for start in range(0, len(train), batch_size):
            out.append(task.draw_losses(model, concat_batches(train[start:start + batch_size]), seed, draws).cpu())
    return torch.cat(out)


def _unlearning_ekfac(task, checkpoint, fisher, factors, qs, train, items, out: Path, work: Path, base, target, seed,
                      query_draws, query_mask, lr, steps, damping, score_draws, batch_size, ckpt_fp) -> int:
    """AbU+: theta' = theta0 + lr/N P grad L(z_hat) with P = EK-FAC (+ the diagonal Fisher off the linear layers),
    tau_i = L(z_i, theta') - L(z_i, theta0) over ``score_draws`` draws, its SE from the per-draw differences."""
    from musicattr.attribution.ekfac import EKFAC
    from musicattr.attribution.preconditioner import DiagonalFisher
    from musicattr.attribution.task import load_theta
    from musicattr.attribution.unlearn import unlearn_query

    _, model = load_theta(task, checkpoint)
    params = task.select_parameters(model, target)
    fallback = None
    names = list(params)
    if fisher:
        fallback = DiagonalFisher.load(fisher, [n for n in names], damping, ckpt_fp)
    precond = EKFAC.load(factors, names, damping, fallback=fallback, checkpoint_fingerprint=ckpt_fp)
    if fallback is None:
        names = [n for n in names if n in precond.owner]
        log.warning("peers/unlearning-ekfac: no Fisher given: only the %d linear-layer tensors are unlearned", len(names))
    num_items = len(train)
    settings = {**base, "peer": "unlearning-ekfac", "preconditioner": precond.provenance(), "lr": lr, "steps": steps,
                "num_draws": query_draws, "mask_unlearn": query_mask, "score_draws": score_draws, "num_items": num_items}
    todo = [q for q in qs if not is_done(out, q["query_id"], "unlearning-ekfac", settings)]
    if not todo:
        return 0
    t0 = time.time()
    cache = work / f"baseline-{settings_key({**base, 'score_draws': score_draws})}.pt"
    if cache.exists():
        baseline = torch.load(cache)
    else:
        baseline = _item_draw_losses(task, model, train, seed, score_draws, batch_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(baseline, cache)
    per_model = time.time() - t0
    log.info("peers/unlearning-ekfac: %d queries (%d done); baseline losses in %.0f s", len(todo), len(qs) - len(todo),
             per_model)
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    t1 = time.time()
    for n, q in enumerate(todo):
        unlearn_query(task, model, q["batch"], precond, num_items, f"^({'|'.join(map(_re, names))})$", lr, steps,
                      query_draws, seed, query_mask)
        after = _item_draw_losses(task, model, train, seed, score_draws, batch_size)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta0[k])
        d = (after - baseline).numpy()
        write_table(out, q["query_id"], "unlearning-ekfac", items, d.mean(1), settings,
                    score_se=d.std(1, ddof=1) / np.sqrt(d.shape[1]), baseline_loss=baseline.mean(1).numpy(),
                    unlearned_loss=after.mean(1).numpy(), extra={"num_draws": np.full(len(d), score_draws)})
        log.info("peers/unlearning-ekfac: %s done (%d of %d, %.0f s per query)", q["query_id"], n + 1, len(todo),
                 (time.time() - t1) / (n + 1))
    _record_cost(out, "unlearning-ekfac", per_model, (time.time() - t1) / len(todo), len(todo))
    return len(todo)


def _re(name: str) -> str:
    import re

    return re.escape(name)
