"""Test-to-train comparison (paper Section 3.3, Figure 1) and the planted-memorisation check.

For each generated query z_hat: attribution by unlearning (Eq. 2 then Eq. 1 over the whole store)
and by the two similarity baselines on audio embeddings of 10 s segments with a 1 s hop:
"all-against-all" (max cosine over all segment pairs) and "average" (cosine of time-averaged
embeddings). Reports the Pearson and Spearman correlations between unlearning scores and each
baseline (mean over queries), draws Figure 1, and, for queries generated from the captions of
planted (duplicated) training tracks, recall@1 / recall@10 of the planted group per method, and for
every query and method the mean rank percentile of the training tracks that share the prompt's
composer or collection and instrument (``attribute_match``; chance 50%).
Training items can be attributed as queries too (``query_items``, train-to-train: unlearned as in
``evaluate``, their own audio for the similarity baselines); they get the same per-query tables, and
``queries.csv`` says each query's kind (generated, planted, training), but Figure 1 and the summary's
correlations stay over the generated queries, as in the paper.
With ``relative``, the unlearning scores are also ranked by tau_i / s_i (RelatIF, method
"unlearning-relative"), with their own correlations and recall; Figure 1 shows Eq. 1 as in the paper.
With ``index`` (a ``musicattr index``), each query is also scored by the index from its unlearned weights
(method "index", first-order Eq. 1, no extra gradient), with its own correlations and recall and its
agreement with the unlearning scores (Spearman, top-10 overlap).

A rerun reuses only what was made with the same settings: the generated queries (``generated/
settings.json``), each query's unlearned weights (their metadata, see ``run_unlearn(reuse=True)``) and
scores (the run key of ``musicattr attribute``); anything else is recomputed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from musicattr.attribution.methods import resolve_method
from musicattr.attribution.settings import ScoreSettings, UnlearnSettings
from musicattr.attribution.similarity import all_against_all, average, similarity_table, store_audio_embeddings
from musicattr.attribution.unlearn import run_unlearn
from musicattr.atomic import atomic_path, atomic_write_json, atomic_write_text
from musicattr.data.latent_store import LatentStore
from musicattr.attribution.task import AttributionTask
from musicattr.evaluation.attribute_match import match_markdown, query_percentiles
from musicattr.evaluation.common import (diverse_items, planted_groups, read_metadata_rows, score_store,
                                         store_folder, unlearn_device)
from musicattr.wandb_logger import open_wandb
from musicattr.evaluation.figure1 import plot_figure1
from musicattr.evaluation.metrics import correlations

log = logging.getLogger(__name__)


def planted_queries(store: LatentStore, meta: dict[str, dict], columns: list[str]) -> list[dict]:
    """One query per planted group: the caption and duration of its original track, and its ``columns``."""
    groups = planted_groups(store)
    items = store.items.set_index("file_name")
    out = []
    for original in sorted(set(groups.values())):
        if original in items.index:
            r = items.loc[original]
            attributes = {c: meta.get(original, {}).get(c) for c in columns}
            out.append({"prompt": r["caption"], "duration": float(r["duration_s"]), "planted_group": original,
                        "attributes": {c: v for c, v in attributes.items() if v is not None}})
    return out


def recall_at(tables: dict[str, pd.DataFrame], group: str, groups: dict[str, str], ks=(1, 10)) -> dict[str, float]:
    """1 if a member of the planted group is among the top k of a method's table, for each method and k."""
    out = {}
    for method, t in tables.items():
        ranked = list(t.sort_values("rank")["file_name"])
        for k in ks:
            out[f"{method}@{k}"] = float(any(groups.get(f) == group for f in ranked[:k]))
    return out


def generated_queries(gen_dir: Path, queries: list[dict], checkpoint: str, store: LatentStore, gen_steps: int,
                      seed: int, first_id: int = 0) -> list[dict]:
    """The generated query of each prompt: reused from ``gen_dir`` if it was generated with the same prompts,
    durations, checkpoint, autoencoder, store, sampler steps, seed and first id (``settings.json``), else generated
    anew. ``first_id``: the first query's number (a later batch continues the ids and the sampler seeds)."""
    import shutil

    from musicattr.models.generate import generate
    from musicattr.fingerprint import file_fingerprint

    autoencoder = store.manifest["autoencoder"]
    settings = {"prompts": [q["prompt"] for q in queries], "durations": [q["duration"] for q in queries],
                "checkpoint_fingerprint": file_fingerprint(checkpoint),
                "autoencoder_fingerprint": file_fingerprint(autoencoder), "store_fingerprint": store.fingerprint,
                "gen_steps": gen_steps, "seed": seed, **({"first_id": int(first_id)} if first_id else {})}
    key_file = gen_dir / "settings.json"
    if key_file.exists() and json.loads(key_file.read_text()) == settings and (gen_dir / "queries.json").exists():
        infos = json.loads((gen_dir / "queries.json").read_text())
        if len(infos) == len(queries):
            log.info("compare: the %d generated queries in %s are up to date: reused", len(infos), gen_dir)
            return infos
    shutil.rmtree(gen_dir, ignore_errors=True)
    infos = generate(checkpoint, autoencoder, str(gen_dir), settings["prompts"], settings["durations"],
                     store=str(store.root), steps=gen_steps, seed=seed,
                     autoencoder_config=store.manifest.get("autoencoder_config"), first_id=first_id)
    atomic_write_json(key_file, settings)
    return infos


def run_comparison(checkpoint: str, store: str, fisher: str, out_dir: str, prompts: list[str] | None = None,
                   durations: list[float] | None = None, include_planted: bool = True,
                   unlearning: UnlearnSettings = UnlearnSettings(), scoring: ScoreSettings = ScoreSettings(),
                   audio_encoder: str = "aisfx", audio_encoder_checkpoint: str | None = None, gen_steps: int = 50,
                   seed: int = 0, listen_top_k: int = 3, use_wandb: bool = True,
                   query_items: list[str] | None = None, training_queries: int = 0,
                   index: str | None = None, task: AttributionTask | None = None,
                   trainer: dict | None = None,
                   prompt_attributes: list[dict] | None = None,
                   match_columns: list[str] = ("source_group", "instrument"), first_id: int = 0) -> dict:
    """Attribute generated queries by unlearning and by similarity; write comparison.json, figure1.png.

    Args:
        prompts / durations: the test prompts (the paper: 16 two-minute tracks from distinct prompts).
        include_planted: also generate from the captions of planted tracks (memorisation ground truth).
        unlearning: Eq. 2 of every query (the paper's best: all blocks, mixed masking, 1 step).
        scoring: Eq. 1 over the store (T draws per item; ``relative`` also ranks by tau_i / s_i, method
            "unlearning-relative").
        audio_encoder: embeddings for the similarity baselines ('aisfx' offline; 'clap' with a checkpoint).
        listen_top_k: training tracks logged next to each query's audio in the dashboard.
        query_items: training items attributed as queries (item ids, or ``index:N``), ids ``t000``, ``t001``, ...;
            not in Figure 1 nor in the summary's correlations (the counterfactual campaign uses them).
        training_queries: that many more training items as queries, chosen as ``evaluate`` chooses its targets
            (k-means over the audio embeddings, no planted duplicate).
        index: an attribution index of this checkpoint, Fisher, target, damping, T = scoring.draws and strategy;
            also score each query with it (methods "index", "index-relative"), compared with the unlearning scores.
        task: the attribution task (default: the SAT DiT of ``musicattr fit``; generation uses SAT's sampler).
        trainer: Trainer options of the scoring passes (``--trainer.*``, as in the Lightning stages).
        prompt_attributes: per prompt, the metadata values it names ({column: value}); planted queries take
            their original track's values of ``match_columns``.
        match_columns: metadata columns whose matching tracks' rank percentile is reported (chance 50%).
        first_id: the first generated query's number (``q{first_id:03d}``; its sampler seed is seed + first_id):
            a later batch of a bank's queries keeps the bank's ids.
    """
    from musicattr.embeddings.audio import build_audio_encoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = LatentStore(store)
    encoder = build_audio_encoder(audio_encoder, audio_encoder_checkpoint)
    emb = store_audio_embeddings(s, encoder)
    meta = read_metadata_rows(s)
    # 1. the queries: prompts, planted captions (generated by theta0), training items
    queries = prompt_queries(s, meta, prompts, durations, prompt_attributes, include_planted, match_columns)
    infos = generated_queries(out / "generated", queries, checkpoint, s, gen_steps, seed, first_id)
    training = training_query_list(s, emb, query_items, training_queries, seed)
    queries += training
    infos += [{"query_id": f"t{j:03d}"} for j in range(len(training))]
    # 2. every method's scores table per query, and the query's row of measures
    ctx = None
    if index:
        from musicattr.attribution.query import open_query

        ctx = open_query(index, checkpoint, fisher, store, unlearning.strategy, target=unlearning.target,
                         damping=unlearning.damping, score_draws=scoring.draws, score_seed=seed, task=task)
    sims = [f"all-against-all[{encoder.name}]", f"average[{encoder.name}]"]
    sources = ["unlearning", "unlearning-relative"] if scoring.relative else ["unlearning"]
    if ctx is not None:
        sources += ["index", "index-relative"] if scoring.relative else ["index"]
    methods = {m: [] for m in sources + sims}
    groups = planted_groups(s)
    items = s.items.to_dict("records")
    rows = []
    for q, info in zip(queries, infos, strict=True):
        qid = info["query_id"]
        tables, row_index, query_audio = score_query(q, info, out, checkpoint, fisher, s, items, emb, encoder,
                                                     unlearning, scoring, seed, trainer, task, ctx)
        by_index = {m: torch.tensor(t.sort_values("index")["score"].to_numpy()) for m, t in tables.items()}
        if not q.get("query_item"):
            for m in methods:
                methods[m].append(by_index[m])
        row = query_row(q, qid, tables, by_index, sources, sims, groups, meta, row_index)
        rows.append(row)
        log.info("[compare] %s: %s", qid, ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
        _listen(out, qid, query_audio, q["prompt"], tables["unlearning"], store_folder(s), listen_top_k)
    # 3. the summary over the generated queries: correlations, recall, attribute match, Figure 1, dashboard
    return summarize(out, pd.DataFrame(rows), {m: torch.stack(v) for m, v in methods.items()}, sims, encoder.name,
                     len(s), match_columns, use_wandb)


def prompt_queries(s: LatentStore, meta: dict[str, dict], prompts, durations, prompt_attributes,
                   include_planted: bool, match_columns) -> list[dict]:
    """The queries generated by theta0: one per prompt, and one per planted group (its original's caption)."""
    prompts = list(prompts or [])
    durations = list(durations) if durations is not None else [None] * len(prompts)
    if len(durations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(durations)} durations; fix: give one duration per prompt")
    attrs = list(prompt_attributes) if prompt_attributes is not None else [{}] * len(prompts)
    if len(attrs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(attrs)} prompt_attributes; fix: give one mapping per prompt")
    queries = [{"prompt": p, "duration": d, "planted_group": None, "attributes": dict(a or {})}
               for p, d, a in zip(prompts, durations, attrs)]
    if include_planted:
        queries += planted_queries(s, meta, list(match_columns))
    if not queries:
        raise ValueError("no queries: give prompts, or a corpus with planted tracks and include_planted")
    return queries


def training_query_list(s: LatentStore, emb, query_items, training_queries: int, seed: int) -> list[dict]:
    """Training items as queries (train-to-train): the named ones, then ``training_queries`` diverse ones."""
    items = s.items.to_dict("records")
    picks = [s.resolve(key) for key in query_items or []]
    if training_queries:
        picks += [i for i in diverse_items(s, emb.track_means().float(), training_queries, seed) if i not in picks]
    return [{"prompt": items[pos]["caption"], "duration": float(items[pos]["duration_s"]), "planted_group": None,
             "query_item": str(items[pos]["item_id"]), "position": pos} for pos in picks]


def score_query(q: dict, info: dict, out: Path, checkpoint: str, fisher: str, s: LatentStore, items: list[dict],
                emb, encoder, unlearning: UnlearnSettings, scoring: ScoreSettings, seed: int, trainer, task, ctx
                ) -> tuple[dict[str, pd.DataFrame], dict, Path]:
    """One query's scores tables by every method (unlearning: Eq. 2 then Eq. 1; the index; the similarity
    baselines), each written where the method registry says; also the index's agreement and the query's audio.
    ``items``: the store's items as records, made once per run."""
    from musicattr.embeddings.audio import load_audio

    qid, item = info["query_id"], q.get("query_item")
    qdir = out / "queries" / qid
    unlearned = qdir / "unlearned.safetensors"
    gen_dir = out / "generated"
    source = {"query_item": item, "store": str(s.root)} if item else {"query": str(gen_dir / f"{qid}.query.safetensors")}
    run_unlearn(checkpoint, fisher, str(unlearned), **source, **unlearning.kwargs(), seed=seed, reuse=True, task=task,
                device=unlearn_device(trainer))
    tables = {"unlearning": score_store(checkpoint, str(s.root), str(unlearned),
                                        str(resolve_method("unlearning").path(out, qid).parent), scoring.draws, seed,
                                        scoring.batch_size, trainer, relative=scoring.relative, task=task)}
    if scoring.relative:
        t = tables["unlearning"]
        tables["unlearning-relative"] = (t.assign(score=t["relative_score"], rank=t["relative_rank"],
                                                  method="unlearning-relative").sort_values("rank"))
    row_index = {}
    if ctx is not None:
        row_index = _index_tables(ctx, tables, str(unlearned), qid, resolve_method("index").path(out, qid).parent,
                                  scoring.relative)
    query_audio = store_folder(s) / items[q["position"]]["file_name"] if item else gen_dir / info["audio"]
    qseg = emb.item(q["position"]) if item else encoder.embed_segments(*load_audio(str(query_audio)))
    for name, fn in ((f"all-against-all[{encoder.name}]", all_against_all), (f"average[{encoder.name}]", average)):
        tables[name] = similarity_table(fn(qseg, emb), items, method=f"similarity/{name}", query_id=qid)
        with atomic_path(resolve_method(name).path(out, qid)) as tmp:
            tables[name].to_parquet(tmp, index=False)
    return tables, row_index, query_audio


def query_row(q: dict, qid: str, tables: dict[str, pd.DataFrame], by_index: dict[str, torch.Tensor], sources,
              sims, groups, meta, row_index: dict) -> dict:
    """One row of queries.csv: the query, each method's correlation with each similarity baseline, planted
    recall, the attribute-matched rank percentiles and the index's agreement."""
    item = q.get("query_item")
    kind = "training" if item else "planted" if q["planted_group"] else "generated"
    row = {"query_id": qid, "kind": kind, "prompt": q["prompt"], "planted_group": q["planted_group"],
           "query_item": item, **row_index}
    for src in sources:
        for m in sims:
            c = correlations(by_index[src], by_index[m])
            key = m if src == "unlearning" else f"{src}~{m}"
            row[f"pearson[{key}]"], row[f"spearman[{key}]"] = c["pearson"], c["spearman"]
    if q["planted_group"]:
        row.update(recall_at(tables, q["planted_group"], groups))
    row.update(query_percentiles(tables, meta, q.get("attributes", {})))
    row["top1_unlearning"] = tables["unlearning"].iloc[0]["item_id"]
    return row


def summarize(out: Path, all_queries: pd.DataFrame, stacked: dict[str, torch.Tensor], sims: list[str],
              encoder: str, items: int, match_columns, use_wandb: bool) -> dict:
    """queries.csv, figure1.png, attribute_match.md, comparison.json and the dashboard; the summary's means are
    over the generated queries (training-item queries are listed, never averaged in)."""
    atomic_write_text(out / "queries.csv", all_queries.to_csv(index=False))
    per_query = all_queries[all_queries["kind"] != "training"]
    plot_figure1(stacked["unlearning"], {m: stacked[m] for m in sims},
                 str(out / "figure1.png"), title=f"Unlearning vs similarity attribution ({len(per_query)} queries)")
    summary = {"queries": len(per_query), "training_queries": len(all_queries) - len(per_query),
               "audio_encoder": encoder, "items": items,
               **{c: float(per_query[c].mean()) for c in per_query.columns if c.startswith(("pearson", "spearman", "top10"))}}
    planted = per_query[per_query["planted_group"].notna()]
    if len(planted):
        summary.update({f"recall_{c}": float(planted[c].mean()) for c in planted.columns if "@" in c})
        summary["planted_queries"] = len(planted)
    columns = [c for c in match_columns if any(f"|{c}]" in k for k in per_query.columns)]
    summary.update({k: float(per_query[k].mean()) for k in per_query.columns if k.startswith(("pct[", "base["))})
    match = "".join(f"\n{title} ({len(sub)}):\n\n" + match_markdown(sub, list(stacked), columns)
                    for title, sub in (("All queries", per_query),
                                       ("Generated from new prompts", per_query[per_query["kind"] == "generated"]),
                                       ("Planted prompts", per_query[per_query["kind"] == "planted"])) if len(sub))
    atomic_write_text(out / "attribute_match.md",
                      "Per method: the mean rank percentile of the training tracks that share the prompt's attribute "
                      "(0% = top, chance 50%), the share of the top 10 that match (chance: the base rate), and "
                      "planted recall.\n" + match)
    print(match, flush=True)
    atomic_write_json(out / "comparison.json", summary)
    log.info(json.dumps(summary, indent=2))
    _dashboard(out, summary, per_query, use_wandb)
    return summary


def _index_tables(ctx, tables: dict[str, pd.DataFrame], unlearned: str, qid: str, out: Path, relative: bool
                  ) -> dict[str, float]:
    """Add the index's tables of one query (psi from its unlearned weights) to ``tables``; write its
    ``scores.parquet``; return its agreement with the unlearning scores."""
    from musicattr.attribution.query import index_table
    from musicattr.evaluation.fidelity import agreement

    psi, _ = ctx.from_unlearned(unlearned)
    t = index_table(ctx.index, ctx.store, ctx.scores([psi])[:, 0], qid, relative)
    with atomic_path(out / "scores.parquet") as tmp:
        t.to_parquet(tmp, index=False)
    tables["index"] = t
    if relative:
        tables["index-relative"] = (t.assign(score=t["relative_score"], rank=t["relative_rank"],
                                             method="index-relative").sort_values("rank"))
    exact, est = (tables[m].sort_values("index")["score"].to_numpy() for m in ("unlearning", "index"))
    a = agreement(est, exact, ks=(10,))
    return {"spearman[index~unlearning]": a["spearman"], "top10[index~unlearning]": a["top10"]}


def _listen(out: Path, qid: str, query_audio: Path, prompt: str, table: pd.DataFrame, folder: Path, k: int) -> None:
    """Keep, per query, the paths a person needs to listen side by side (logged by the dashboard)."""
    top = table.head(k)[["rank", "item_id", "caption", "file_name", "score"]].to_dict("records")
    for t in top:
        t["path"] = str(folder / t["file_name"])
    atomic_write_json(out / "queries" / qid / "listen.json", {"query_audio": str(query_audio), "prompt": prompt,
                                                              "top": top})


def _dashboard(out: Path, summary: dict, per_query: pd.DataFrame, enabled: bool) -> None:
    run = open_wandb("figure1", summary, enabled)
    if run is None:
        return
    import wandb

    listen_rows = []
    for qdir in sorted((out / "queries").glob("*/listen.json")):
        d = json.loads(qdir.read_text())
        for t in d["top"]:
            listen_rows.append([d["prompt"], wandb.Audio(d["query_audio"]), t["rank"], t["caption"],
                                wandb.Audio(t["path"]), t["score"]])
    run.log({"figure1": wandb.Image(str(out / "figure1.png")), "queries": wandb.Table(dataframe=per_query),
             "listen": wandb.Table(columns=["prompt", "generated", "rank", "training caption", "training track",
                                            "tau"], data=listen_rows),
             **{k: v for k, v in summary.items() if isinstance(v, float)}})
    run.finish()
