"""One query's report folder: ``index.html``, ``credits.csv`` (+ one CSV per aggregation column),
``audio/`` (the query and its top-k tracks, transcoded) and ``img/`` (spectrograms, score plot)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from musicattr.report.baselines import SimilarityScores
from musicattr.report.credits import aggregate_credits, credit_shares, rule_text, share_intervals
from musicattr.report.inputs import QueryInputs, ReportInputError
from musicattr.report.media import read_audio, scores_png, spectrogram_png, write_audio
from musicattr.report.page import CreditTable, QueryPage, Track, render_query

log = logging.getLogger(__name__)

# Metadata shown per track when present (the embedded corpus' columns; user folders may have none).
DEFAULT_METADATA = ["title", "composer", "collection", "kind", "instrument", "source", "planted_group", "licence"]


@dataclass
class ReportOptions:
    top_k: int = 10
    credit_rule: str = "positive"
    credit_score: str = "score"
    temperature: float = 1.0
    group_by: list[str] = field(default_factory=list)
    metadata_columns: list[str] | None = None
    audio_format: str = "wav"
    track_spectrograms: bool = True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "column"


def _check_columns(q: QueryInputs, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in q.scores]
    if missing:
        where = q.audio_folder or q.store.root
        raise ReportInputError(f"{what} {missing} not in the track metadata of {where} (columns: "
                               f"{', '.join(sorted(map(str, q.scores.columns)))}); fix: add them to its "
                               f"metadata.jsonl, or name other columns")


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != ""


def _clear(out: Path) -> None:
    """Remove what an earlier render of this folder wrote under names that may not be rewritten."""
    for pattern in ("audio/query.*", "audio/track-*", "img/track-*.png", "img/query.png", "credits_by_*.csv"):
        for p in out.glob(pattern):
            p.unlink()


def _copy_audio(src: Path | None, unknown: str, stem: Path, fmt: str, out: Path, spectrogram: Path | None,
                size: tuple[float, float] = (3.6, 1.5), title: str = "") -> tuple[str | None, str, str | None]:
    """(audio href, note when missing, spectrogram href) for one audio file copied into the report;
    ``unknown`` is the note when there is no path at all."""
    if src is None:
        return None, unknown, None
    data, sr, why = read_audio(src)
    if data is None:
        log.warning("%s", why)
        return None, why, None
    href = write_audio(data, sr, stem, fmt).relative_to(out).as_posix()
    spec = spectrogram_png(data, sr, spectrogram, title, size) if spectrogram else None
    return href, "", spec.relative_to(out).as_posix() if spec else None


def write_credits(table: pd.DataFrame, out: Path, group_by: list[str], shown: list[str]) -> list[CreditTable]:
    """``credits.csv`` (every credited track) and ``credits_by_<column>.csv`` per aggregation column."""
    credited = table[table["share"] > 0]
    cols = dict.fromkeys(["rank", "relative_rank", "item_id", "file_name", "caption", "score", "score_se",
                          "relative_score", "share", "share_lo", "share_hi", *group_by, *shown])
    credited[[c for c in cols if c in credited]].to_csv(out / "credits.csv", index=False)
    tables = []
    for col in group_by:
        agg = aggregate_credits(credited, col)
        name = f"credits_by_{_slug(col)}.csv"
        agg.to_csv(out / name, index=False)
        tables.append(CreditTable(col, name, list(agg[[col, "share", "tracks"]].itertuples(index=False, name=None))))
    return tables


def _provenance(q: QueryInputs, sims: SimilarityScores, opt: ReportOptions) -> list[tuple[str, Any]]:
    run, u = q.run, q.run.get("unlearned", {})
    na = "—"
    floor = q.noise_floor
    return [
        ("scores", q.scores_dir / "scores.parquet"),
        ("query", u.get("query") or (f"training item {u['query_item']}" if u.get("query_item") else na)),
        ("checkpoint θ0", f"{u.get('checkpoint', na)} (fingerprint {run.get('checkpoint_fingerprint', na)})"),
        ("Fisher", f"{u.get('fisher', na)} (fingerprint {u.get('fisher_fingerprint', na)}, N = "
                   f"{u.get('num_items', na)})"),
        ("preconditioner P", (f"EK-FAC on the linear layers (AbU+; factors {u.get('ekfac')}, fingerprint "
                              f"{u.get('ekfac_fingerprint', na)}), the diagonal Fisher elsewhere")
         if u.get("preconditioner") == "ekfac" else "the diagonal Fisher (F + lambda)^-1"),
        ("unlearned weights", f"fingerprint {run.get('unlearned_fingerprint', na)}"),
        ("Eq. 2 unlearning", f"lr {u.get('lr', na)}, steps {u.get('steps', na)}, K = {u.get('num_draws', na)} "
                             f"query draws, target {u.get('target', na)}, damping {u.get('damping', na)}"),
        ("masking strategy", f"{u.get('strategy', na)} (M_U {u.get('mask_unlearn', na)}, M_L "
                             f"{run.get('mask_loss', na)})"),
        ("Eq. 1 scoring", f"T = {run.get('num_draws', na)} draws per item, seed {run.get('seed', na)}, "
                          f"timesteps {run.get('timesteps', 'uniform')}, draws "
                          f"{'shared by every item' if run.get('draws') == 'shared' else 'per item'}, "
                          f"relative {'on' if 'relative_rank' in q.scores else 'off'}"),
        ("draw noise", na if "score_se" not in q.scores else
         f"median standard error of a score {float(q.scores['score_se'].median()):.2e}; share intervals: "
         "95% parametric bootstrap over the draws (1000 resamples)"),
        ("latent store", f"{q.store.root} ({len(q.store)} items)"),
        ("similarity encoder", sims.encoder or na),
        ("noise floor", na if floor is None else f"{floor:.3e} (float error of the losses, noise.json)"),
        ("credit rule", rule_text(opt.credit_rule, opt.credit_score, opt.temperature)),
    ]


def _scores_plot(q: QueryInputs, sims: SimilarityScores, path: Path) -> Path:
    by_index = q.scores.sort_values("index")
    others = {}
    for name, t in sims.tables.items():
        t = t.sort_values("index")
        if list(t["index"]) == list(by_index["index"]):
            others[name] = t["score"].to_numpy(np.float64)
        else:
            log.warning("the %s scores cover other items than the unlearning scores; left out of the plot", name)
    return scores_png(by_index["score"].to_numpy(np.float64), others, path,
                      f"Query {q.query_id}: scores of the {len(by_index)} training tracks")


def write_query_report(q: QueryInputs, out: str | Path, sims: SimilarityScores, opt: ReportOptions,
                       back: str | None = None) -> Path:
    """Write the report folder of one query; returns its ``index.html``."""
    out = Path(out)
    shown = opt.metadata_columns if opt.metadata_columns is not None else \
        [c for c in DEFAULT_METADATA if c in q.metadata_columns]
    _check_columns(q, opt.group_by, "the columns to aggregate credits by")
    _check_columns(q, shown, "the metadata columns")
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    table = q.scores.copy()
    table["share"] = credit_shares(table, opt.credit_rule, opt.credit_score, q.noise_floor or 0.0, opt.temperature)
    table = table.join(share_intervals(table, opt.credit_rule, opt.credit_score, q.noise_floor or 0.0,
                                       opt.temperature))
    credit_tables = write_credits(table, out, opt.group_by, shown)
    q_audio, q_note, q_spec = _copy_audio(q.query_audio, "the query's audio is unknown; fix: pass --query_audio",
                                          out / "audio" / "query", opt.audio_format, out, out / "img" / "query.png",
                                          (8.0, 2.6), f"query {q.query_id}")
    ranks = {name: dict(zip(t["index"].astype(int), t["rank"].astype(int))) for name, t in sims.tables.items()}
    folder = q.audio_folder
    tracks = []
    for k, r in enumerate(table.head(opt.top_k).to_dict("records"), 1):
        src = folder / r["file_name"] if folder else None
        spec = out / "img" / f"track-{k:02d}.png" if opt.track_spectrograms else None
        href, note, spec_href = _copy_audio(src, f"the latent store {q.store.root} names no audio folder",
                                            out / "audio" / f"track-{k:02d}", opt.audio_format, out, spec)
        rel = r.get("relative_rank")
        tracks.append(Track(int(r["rank"]), str(r["item_id"]), str(r["caption"]), str(r["file_name"]),
                            float(r["score"]), float(r["share"]), None if rel is None or pd.isna(rel) else int(rel),
                            {n: m[int(r["index"])] for n, m in ranks.items() if int(r["index"]) in m},
                            {c: r[c] for c in shown if _present(r.get(c))}, href, note, spec_href))
    plot = _scores_plot(q, sims, out / "img" / "scores.png")
    credited = table[table["share"] > 0]
    page = QueryPage(
        query_id=q.query_id, prompt=q.prompt, audio=q_audio, audio_note=q_note, spectrogram=q_spec, tracks=tracks,
        n_items=len(table), scores_plot=plot.relative_to(out).as_posix(),
        rule=rule_text(opt.credit_rule, opt.credit_score, opt.temperature), credited=len(credited),
        top_k_share=float(table["share"].head(opt.top_k).sum()), noise_floor=q.noise_floor,
        top_score=float(table["score"].max()) if len(table) else float("nan"), credit_tables=credit_tables,
        similarity_labels=list(sims.tables), similarity_note=sims.note, relative="relative_rank" in table,
        provenance=_provenance(q, sims, opt), back=back)
    index = out / "index.html"
    index.write_text(render_query(page), encoding="utf-8")
    log.info("report of query %s: %s (%d credited tracks)", q.query_id, index, len(credited))
    return index
