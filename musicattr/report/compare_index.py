"""The report of a ``musicattr compare`` run: one query folder each, and an index page over them.

Reads the compare folder's layout: ``generated/queries.json`` and the queries' audio,
``queries/<qid>/unlearning/`` (scores, run.json, noise.json), ``queries/<qid>/index/scores.parquet`` (with
``--index``), ``queries/<qid>/all-against-all.parquet``
and ``average.parquet``, ``queries.csv`` (per-query correlations and recall), ``comparison.json`` and
``figure1.png``. Writes ``<out>/index.html``, ``<out>/figure1.png`` and ``<out>/<qid>/`` per query.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from musicattr.report.baselines import similarity_scores
from musicattr.report.inputs import ReportInputError, load_query_inputs
from musicattr.report.page import IndexRow, render_index
from musicattr.report.query import ReportOptions, write_query_report

log = logging.getLogger(__name__)

INDEX_TOP = 3  # tracks per method on the index page


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _top(table: pd.DataFrame, rank: str, captions: dict[int, str]) -> list[tuple[int, str]]:
    t = table.sort_values(rank).head(INDEX_TOP)
    return [(int(r[rank]), captions.get(int(r["index"]), "?")) for _, r in t.iterrows()]


def write_compare_report(compare: str | Path, out: str | Path, opt: ReportOptions, store: str | None = None,
                         similarity: str = "auto", audio_encoder: str = "aisfx",
                         audio_encoder_checkpoint: str | None = None) -> Path:
    """Write every query's report of the compare run in ``compare`` and the index page; returns it."""
    compare, out = Path(compare), Path(out)
    listing = compare / "generated" / "queries.json"
    if not listing.exists():
        raise ReportInputError(f"{listing} not found: {compare} is not the out_dir of a finished "
                               "`musicattr compare`; fix: pass that folder, or --scores for one query")
    infos = json.loads(listing.read_text())
    per_query = pd.read_csv(compare / "queries.csv") if (compare / "queries.csv").exists() else pd.DataFrame()
    stats_by_q = per_query.set_index("query_id").to_dict("index") if "query_id" in per_query else {}
    stat_cols = [c for c in per_query.columns if c.startswith(("pearson[", "spearman[")) and "~" not in c]
    rows, methods = [], []
    for info in infos:
        qid = info["query_id"]
        scores_dir = compare / "queries" / qid / "unlearning"
        if not (scores_dir / "scores.parquet").exists():
            log.warning("query %s has no scores in %s: left out of the report", qid, scores_dir)
            continue
        q = load_query_inputs(scores_dir, str(compare / "generated" / info["audio"]), info.get("caption"), store)
        sims = similarity_scores(q, similarity, audio_encoder, audio_encoder_checkpoint)
        write_query_report(q, out / qid, sims, opt, back="../index.html")
        captions = dict(zip(q.scores["index"].astype(int), q.scores["caption"].astype(str)))
        tops = {"unlearning (Eq. 1)": _top(q.scores, "rank", captions)}
        if "relative_rank" in q.scores:
            tops["unlearning (relative)"] = _top(q.scores, "relative_rank", captions)
        index_scores = compare / "queries" / qid / "index" / "scores.parquet"
        if index_scores.exists():  # compare run with --index: the index's first-order scores
            t = pd.read_parquet(index_scores)
            tops["index (first order)"] = _top(t, "rank", captions)
            if "relative_rank" in t:
                tops["index (relative)"] = _top(t, "relative_rank", captions)
        tops.update({name: _top(t, "rank", captions) for name, t in sims.tables.items()})
        methods += [m for m in tops if m not in methods]
        audio = next((out / qid / "audio").glob("query.*"), None)
        stats = {c: _fmt(v) for c, v in stats_by_q.get(qid, {}).items() if c in stat_cols and pd.notna(v)}
        rows.append(IndexRow(qid, q.prompt, audio.relative_to(out).as_posix() if audio else None,
                             "the query's audio is missing", f"{qid}/index.html", tops, stats))
    if not rows:
        raise ReportInputError(f"no query of {compare} has scores; fix: let `musicattr compare` finish")
    figure = None
    if (compare / "figure1.png").exists():
        shutil.copyfile(compare / "figure1.png", out / "figure1.png")
        figure = "figure1.png"
    summary = json.loads((compare / "comparison.json").read_text()) if (compare / "comparison.json").exists() else {}
    index = out / "index.html"
    index.write_text(render_index(f"musicattr report: {len(rows)} queries of {compare}", rows, methods, stat_cols,
                                  figure, [(k, _fmt(v)) for k, v in summary.items()]), encoding="utf-8")
    return index
