"""Similarity-baseline scores of one query, for the ranks the report shows beside Eq. 1.

Three sources, tried in this order:

1. a ``musicattr compare`` run: its ``queries/<qid>/all-against-all.parquet`` and ``average.parquet``
   lie beside the query's ``unlearning/`` scores;
2. the training embeddings cached in ``<store>/audio_embeddings/<encoder>`` (written by ``compare`` and
   ``evaluate``): only the query's audio is embedded;
3. with ``mode="compute"``, the training embeddings are computed first (and cached for later runs).

``mode="none"`` skips them. When no source is usable the report says why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from musicattr.attribution.methods import registered
from musicattr.attribution.scores_table import check_scores_table
from musicattr.report.inputs import QueryInputs

log = logging.getLogger(__name__)

MODES = ("auto", "compute", "none")
COMPARE_FILES = tuple(Path(registered(m).table).name for m in ("all-against-all", "average"))  # the registry's tables


@dataclass
class SimilarityScores:
    """``tables``: label (e.g. ``all-against-all[aisfx]``) -> one row per training item with ``index``,
    ``score`` and ``rank``; empty with ``note`` saying why when there are none."""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    encoder: str | None = None
    note: str = ""


def label(method: str) -> str:
    return method.removeprefix("similarity/")


def from_compare(folder: Path) -> SimilarityScores | None:
    """The tables ``musicattr compare`` wrote in ``folder`` (the query's folder), or None."""
    tables = {}
    for name in COMPARE_FILES:
        if (folder / name).exists():
            t = check_scores_table(pd.read_parquet(folder / name), folder / name, columns=["index", "score", "rank",
                                                                                          "method"])
            tables[label(str(t["method"].iloc[0]))] = t[["index", "score", "rank"]]
    if not tables:
        return None
    encoder = next(iter(tables)).partition("[")[2].rstrip("]") or None
    return SimilarityScores(tables, encoder, f"from the compare run in {folder}")


def compute(q: QueryInputs, encoder_name: str, checkpoint: str | None, embed_training: bool) -> SimilarityScores:
    """All-against-all and average similarity of the query's audio to every training track."""
    from musicattr.attribution.similarity import (all_against_all, average, load_train_embeddings, similarity_table,
                                                  store_audio_embeddings)
    from musicattr.embeddings.audio import AUDIO_ENCODERS, build_audio_encoder, load_audio

    if q.query_audio is None or not q.query_audio.exists():
        return SimilarityScores(note="not computed: the query's audio is missing")
    cls = AUDIO_ENCODERS.get(encoder_name.lower())
    cache = q.store.root / "audio_embeddings" / (cls.name if cls else encoder_name)
    ids = list(q.store.items["item_id"].astype(str))
    if not embed_training:
        if not (cache / "meta.json").exists():
            return SimilarityScores(note=f"absent: no compare run beside the scores and no training embeddings in "
                                         f"{cache}; fix: run `musicattr compare`, or pass --similarity compute")
        emb = load_train_embeddings(str(cache))
        if emb.item_ids != ids:
            return SimilarityScores(note=f"absent: the embeddings in {cache} are of other tracks than the store; "
                                         "fix: pass --similarity compute")
        encoder = build_audio_encoder(encoder_name, checkpoint)
    else:
        encoder = build_audio_encoder(encoder_name, checkpoint)
        emb = store_audio_embeddings(q.store, encoder)
    audio, sr = load_audio(str(q.query_audio))
    qseg = encoder.embed_segments(audio, sr)
    items = q.store.items.to_dict("records")
    tables = {}
    for name, fn in (("all-against-all", all_against_all), ("average", average)):
        t = similarity_table(fn(qseg, emb), items, method=f"similarity/{name}[{encoder.name}]", query_id=q.query_id)
        tables[f"{name}[{encoder.name}]"] = t[["index", "score", "rank"]]
    return SimilarityScores(tables, encoder.name, f"computed with {encoder.name} embeddings (training: {cache})")


def similarity_scores(q: QueryInputs, mode: str = "auto", encoder: str = "aisfx",
                      checkpoint: str | None = None) -> SimilarityScores:
    """The query's similarity-baseline tables from the first usable source (see the module doc)."""
    if mode not in MODES:
        raise ValueError(f"unknown similarity mode {mode!r}; fix: choose one of {', '.join(MODES)}")
    if mode == "none":
        return SimilarityScores(note="not requested (--similarity none)")
    found = from_compare(q.scores_dir.parent)
    if found is not None:
        return found
    out = compute(q, encoder, checkpoint, embed_training=mode == "compute")
    if not out.tables:
        log.info("similarity baselines %s", out.note)
    return out
