"""``musicattr ensemble``: the attribution index averaged over several models, for every query of a compare run.

For each member (``ensemble_members``: the benchmark model and refits of the bank's recipe with other training
seeds, each with its own Fisher and index) and each query of ``<compare>/queries.csv`` (generated and planted:
``generated/<id>.query.safetensors``; training items: their store item), the member's index scores of the query:
psi from the gradient of Eq. 2 at the member's parameters and Fisher (lr, K draws keyed ``unlearn/<id>``, M_U;
``query.QueryContext.projected_query``), one product with the member's index. Then the ensemble's table per query
(``musicattr.attribution.ensemble``: the raw mean over members):

    <work_dir>/member-<seed>/queries/<id>/scores.parquet     each member's index table (and settings.json)
    <out_dir>/queries/<id>/index-ensemble/scores.parquet     the ensemble (method ``index-ensemble``)
    <work_dir>/ensemble.json                                 members, settings, costs (seconds) and score scales

Resumable: a member's fit, Fisher and index resume (``ensemble_members``); a member's query table with the same
settings is skipped. ``musicattr benchmark`` reads the ensemble's tables (method ``index-ensemble``) and, as
``{name, table}`` entries, the members' own.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.attribution.ensemble import METHOD, EnsembleError, read_member_scores, write_ensemble_table
from musicattr.attribution.settings import UnlearnSettings
from musicattr.counterfactual.ensemble_members import COSTS, Member, build_member, parse_members

log = logging.getLogger(__name__)
SETTINGS_FILE = "settings.json"


def compare_listing(compare: str | Path, query_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """The queries of a ``musicattr compare`` run (:func:`musicattr.data.queries.compare_listing`); its errors as
    :class:`EnsembleError`."""
    from musicattr.data.queries import compare_listing as listing

    try:
        return listing(compare, query_ids)
    except (FileNotFoundError, ValueError) as e:
        raise EnsembleError(str(e)) from e


def member_table(work_dir: str | Path, member: Member, query_id: str) -> Path:
    return member.folder(work_dir) / "queries" / query_id / "scores.parquet"


def _done(path: Path, settings: dict) -> bool:
    s = path.parent / SETTINGS_FILE
    return path.exists() and s.exists() and json.loads(s.read_text()) == json.loads(json.dumps(settings, default=str))


def score_member(member: Member, paths: dict[str, str], queries: list[dict], work_dir: str | Path, store: str,
                 unlearning: UnlearnSettings, seed: int, draws_per_forward: int, task=None) -> dict[str, Any]:
    """The member's index table of every query (skipping those done with the same settings); returns the seconds
    spent (opening the index, per query)."""
    from musicattr.attribution.query import index_table, open_query
    from musicattr.data.queries import query_fingerprint
    from musicattr.fingerprint import file_fingerprint

    common = {"member": member.name, "checkpoint_fingerprint": file_fingerprint(paths["checkpoint"]),
              "fisher_fingerprint": file_fingerprint(paths["fisher"]), "lr": unlearning.lr,
              "num_draws": unlearning.num_draws, "strategy": unlearning.strategy, "seed": seed,
              "target": unlearning.target, "damping": unlearning.damping}
    todo = []
    for q in queries:
        settings = {**common, "query_id": q["query_id"],
                    "query_fingerprint": query_fingerprint(q["query"], q["query_item"], store)}
        path = member_table(work_dir, member, q["query_id"])
        if not _done(path, settings):
            todo.append((q, settings, path))
    if not todo:
        log.info("ensemble: %s: all %d query tables done", member.name, len(queries))
        return {"open_s": None, "query_s": []}
    t0 = time.perf_counter()
    ctx = open_query(paths["index"], paths["checkpoint"], paths["fisher"], store, unlearning.strategy,
                     target=unlearning.target, damping=unlearning.damping, task=task)
    open_s = time.perf_counter() - t0
    log.info("ensemble: %s: index %s opened in %.1f s; %d of %d queries to score", member.name, paths["index"], open_s,
             len(todo), len(queries))
    times = []
    for n, (q, settings, path) in enumerate(todo):
        t1 = time.perf_counter()
        p, _, info = ctx.projected_query(query=q["query"], query_item=q["query_item"], lr=unlearning.lr,
                                         num_draws=unlearning.num_draws, seed=seed, strategy=unlearning.strategy,
                                         draws_per_forward=draws_per_forward)
        tau = ctx.index.scores(p[:, None])[:, 0]
        df = index_table(ctx.index, ctx.store, tau, q["query_id"], relative=True)
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
        atomic_write_json(path.parent / SETTINGS_FILE, json.loads(json.dumps(settings, default=str)))
        times.append(time.perf_counter() - t1)
        log.info("ensemble: %s: [%d/%d] %s scored in %.1f s", member.name, n + 1, len(todo), q["query_id"], times[-1])
    return {"open_s": open_s, "query_s": times}


def _scales(work_dir: Path, members: list[Member], queries: list[dict], item_ids: list[str]) -> dict[str, float]:
    """Per member: the median over queries of the sd of its scores over the items (how much it weighs in the mean)."""
    out = {}
    for m in members:
        s = read_member_scores([member_table(work_dir, m, q["query_id"]) for q in queries], item_ids)
        out[m.name] = float(np.median(s.std(axis=1)))
    return out


def run_ensemble(compare: str, store: str, members: list, work_dir: str, bank_dir: str = "assets/bank/demo",
                 out_dir: str | None = None, fisher_config: str = "configs/demo/fisher.yaml",
                 index_config: str = "configs/demo/index.yaml", queries: list[str] | None = None,
                 unlearning: UnlearnSettings = UnlearnSettings(), seed: int = 0, draws_per_forward: int = 16,
                 method: str = METHOD, task: Any = None, checkpoint_every: int = 100, threads: int | None = None,
                 trainer: dict | None = None) -> dict:
    """Build the members, score every query on each, write the ensemble's table per query.

    Args:
        compare: the out_dir of ``musicattr compare`` (queries.csv, generated/*.query.safetensors), or a batch
            folder ``musicattr benchmark --prepare true`` prepared for it (bank_queries.csv).
        store: the latent store (the members' training data and the items scored).
        members: ``{seed, checkpoint, fisher, index}`` each; a member without checkpoint is the bank's recipe
            refitted with its seed, one without fisher / index gets them built (``ensemble_members``).
        work_dir: the members' folders (``member-<seed>/``) and ensemble.json.
        bank_dir: the bank whose manifest holds the refits' recipe.
        out_dir: where the ensemble's tables go (``queries/<id>/<method>/scores.parquet``; default: ``compare``).
        fisher_config / index_config: the configs of ``musicattr fisher`` / ``musicattr index`` for the members
            built here (the benchmark model's settings: the Makefile's).
        queries: query ids (default: every query of the compare run).
        unlearning: Eq. 2 of the query gradient (lr, num_draws K, strategy's M_U; target and damping: each index's,
            checked); steps must be 1 (the index's psi is one step). As compare's ``unlearning``.
        seed: the query draws' seed (``unlearn/<id>``), as compare's.
        draws_per_forward: query draws per forward pass.
        method: the ensemble's method name (its table folder).
        task: the attribution task (default: the SAT DiT); checkpoint_every: refit steps between resume checkpoints.
        threads: torch threads (default: leave as set, e.g. by OMP_NUM_THREADS).
        trainer: Trainer options of the refits (accelerator, devices).
    """
    from musicattr.data.latent_store import LatentStore

    if isinstance(unlearning, dict):
        unlearning = UnlearnSettings(**unlearning)
    if unlearning.steps != 1:
        raise EnsembleError(f"unlearning.steps = {unlearning.steps}: the index scores one Eq. 2 step; fix: steps: 1")
    if threads:
        torch.set_num_threads(int(threads))
    mem = parse_members(members)
    work, out = Path(work_dir), Path(out_dir or compare)
    qs = compare_listing(compare, queries)
    s = LatentStore(store)
    items = s.items
    item_ids = list(items["item_id"].astype(str))
    log.info("ensemble: %d members (%s), %d queries of %s; tables to %s", len(mem),
             ", ".join(m.name for m in mem), len(qs), compare, out)
    record: dict[str, Any] = {"method": method, "mean": "raw scores, no normalisation", "compare": str(compare),
                              "store": str(store), "queries": [q["query_id"] for q in qs],
                              "unlearning": unlearning.kwargs(), "seed": seed, "threads": torch.get_num_threads(),
                              "members": {}}
    old = json.loads((work / "ensemble.json").read_text()) if (work / "ensemble.json").exists() else {}
    for k, m in enumerate(mem):
        t0 = time.time()
        log.info("ensemble: member %d/%d: %s", k + 1, len(mem), m.name)
        paths = build_member(m, work, bank_dir, store, fisher_config, index_config, trainer, checkpoint_every)
        timing = score_member(m, paths, qs, work, store, unlearning, seed, draws_per_forward, task)
        prev = old.get("members", {}).get(m.name, {})
        costs_file = m.folder(work) / COSTS
        built = json.loads(costs_file.read_text()) if costs_file.exists() else {}
        qs_times = timing["query_s"]
        record["members"][m.name] = {
            **paths, "seed": m.seed, "given": {k2: bool(getattr(m, k2)) for k2 in ("checkpoint", "fisher", "index")},
            **built,
            "open_s": round(timing["open_s"], 1) if timing["open_s"] is not None else prev.get("open_s"),
            "seconds_per_query": round(float(np.mean(qs_times)), 2) if qs_times else prev.get("seconds_per_query"),
            "queries_timed": len(qs_times) if qs_times else prev.get("queries_timed")}
        log.info("ensemble: %s ready in %.0f s", m.name, time.time() - t0)
    for q in qs:
        path = out / "queries" / q["query_id"] / method / "scores.parquet"
        write_ensemble_table(path, items, [member_table(work, m, q["query_id"]) for m in mem], q["query_id"],
                             [m.name for m in mem], method)
        atomic_write_json(path.parent / SETTINGS_FILE, {
            "members": {m.name: {"table": str(member_table(work, m, q["query_id"])),
                                 "settings": json.loads((member_table(work, m, q["query_id"]).parent
                                                         / SETTINGS_FILE).read_text())} for m in mem},
            "mean": "raw scores, no normalisation"})
    record["score_scale"] = _scales(work, mem, qs, item_ids)
    atomic_write_json(work / "ensemble.json", record)
    log.info("ensemble: %d tables of %s written (mean of %d members); score scale per member (median sd over items): "
             "%s; record %s", len(qs), method, len(mem),
             ", ".join(f"{k}: {v:.3g}" for k, v in record["score_scale"].items()), work / "ensemble.json")
    return record
