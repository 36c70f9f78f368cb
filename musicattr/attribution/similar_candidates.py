"""The similarity proposer of the two-stage query (``musicattr query --exact_top M --similar_top M_s``).

The index ranks items by the first-order score tau^_i = <P phi_i, P psi>. Exact Eq. 1 adds the curvature of the
unlearning step, tau_i ~ g_i . delta + 1/2 delta' H_i delta, whose second term is largest for items whose
outputs the step moves most: near-copies of the query. There the first-order score can be negative while the
exact score is among the largest (README, "Two-stage query"), and no M of the index's top M reaches them.
Near-copies are what a similarity search finds, so the exact stage also scores the query's top M_s training
tracks by all-against-all similarity (Section 3.3: the maximum cosine over (query segment, training segment)
pairs of audio embeddings). Candidates C = top M by tau^ (and by tau^ / s) united with top M_s by similarity;
exact Eq. 1 decides their order, so a proposer can only add exact rows, never change an exact score.

Where a query's similarity comes from, first found first:
  1. ``all-against-all.parquet`` of ``musicattr compare`` beside the query's unlearned file (its folder);
  2. the query's audio (``qNNN.wav`` beside a generated ``qNNN.query.safetensors``, or a training item's own
     file) embedded with the compare stage's audio encoder, against the training embeddings cached in
     ``<store>/audio_embeddings/<encoder>`` (computed there once when absent).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

TABLE = "all-against-all.parquet"  # compare's all-against-all table (the registry's name)


class SimilarityUnavailableError(ValueError):
    """No similarity source for a query; the message names the query and the fix."""


def top_by_similarity(similarity: Mapping[int, float], m: int) -> np.ndarray:
    """Item indices of the top m by similarity (largest first, ties by item index)."""
    idx = np.fromiter(similarity.keys(), dtype=np.int64)
    val = np.fromiter(similarity.values(), dtype=np.float64)
    order = np.lexsort((idx, -val))[:min(int(m), len(idx))]
    return idx[order]


def _from_table(path: Path, items: pd.DataFrame) -> dict[int, float]:
    t = pd.read_parquet(path)
    missing = set(items["index"].astype(int)) - set(t["index"].astype(int))
    if {"index", "score"} - set(t.columns) or missing:
        raise SimilarityUnavailableError(
            f"{path} is not a similarity table of this store ({len(missing)} of its items absent); fix: rerun "
            "`musicattr compare` for this query, or remove the file to compute the similarity from the query's audio")
    t = t[t["index"].astype(int).isin(set(items["index"].astype(int)))]  # only this store's items
    return dict(zip(t["index"].astype(int), t["score"].astype(float)))


def query_audio(meta: Mapping[str, Any], store) -> Path | None:
    """The audio of the query an unlearned file (or gradient query) was made from, where it should be: ``qNNN.wav``
    beside a generated ``qNNN.query.safetensors``, or a training item's own file in the store's audio folder."""
    if meta.get("query"):
        q = Path(meta["query"])
        return q.with_name(q.name.removesuffix(".query.safetensors") + ".wav")
    item = meta.get("query_item")
    folder = store.manifest.get("folder")
    if item is not None and folder:
        key = int(item) if str(item).isdigit() else item
        return Path(folder) / store.items.iloc[store.position_of(key)]["file_name"]
    return None


def _from_audio(audio: Path, store, encoder_name: str, checkpoint: str | None) -> dict[int, float]:
    from musicattr.attribution.similarity import all_against_all, store_audio_embeddings
    from musicattr.embeddings.audio import build_audio_encoder, load_audio

    encoder = build_audio_encoder(encoder_name, checkpoint)
    emb = store_audio_embeddings(store, encoder)  # computed once, then reused from the store
    wav, sr = load_audio(str(audio))
    scores = all_against_all(encoder.embed_segments(wav, sr), emb).double().numpy()
    return dict(zip(store.items["index"].astype(int), scores))


def query_similarity(store, meta: Mapping[str, Any], unlearned: str | None, encoder: str = "aisfx",
                     checkpoint: str | None = None) -> tuple[dict[int, float], str]:
    """(item index -> all-against-all similarity to the query, where it came from) for one query of
    ``musicattr query``: ``meta`` is its record (the unlearned file's metadata, or the gradient query's),
    ``unlearned`` its unlearned file when it has one."""
    if unlearned is not None and (Path(unlearned).parent / TABLE).exists():
        path = Path(unlearned).parent / TABLE
        return _from_table(path, store.items), str(path)
    audio = query_audio(meta, store)
    if audio is None or not audio.exists():
        where = f" (looked for {audio})" if audio is not None else ""
        raise SimilarityUnavailableError(
            f"query {meta.get('query_id')}: no similarity to propose candidates from: no {TABLE} beside "
            f"{unlearned or 'its unlearned file'} and no audio of the query{where}; fix: run `musicattr compare` "
            "for it, put its audio there, or set similar_top null")
    return _from_audio(audio, store, encoder, checkpoint), f"{audio} ({encoder})"
