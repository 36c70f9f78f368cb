"""What a report reads for one query: the scores of ``musicattr attribute`` and what they point to.

From the attribution folder: ``scores.parquet`` (one row per training item), ``run.json`` (the run
key: fingerprints, the unlearning metadata, T, seed, store) and ``noise.json`` (float error).
From there: the query's audio and prompt (``musicattr generate``'s ``qNNN.wav`` and
``queries.json``, or the training item of a train-to-train query) and the latent store, whose audio
folder holds the training tracks and their ``metadata.jsonl`` (every column but file_name optional).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from musicattr.attribution.scores_table import READ_COLUMNS, ScoresTableError, check_scores_table
from musicattr.data.audio_folder import MetadataError, read_metadata
from musicattr.data.latent_store import LatentStore, StoreError

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"


class ReportInputError(ValueError):
    """An input of the report is missing or unusable (the message names the file and the fix)."""


@dataclass
class QueryInputs:
    scores_dir: Path
    scores: pd.DataFrame            # scores.parquet sorted by rank, with the metadata columns joined
    run: dict[str, Any]             # run.json ({} when absent)
    noise: dict[str, Any] | None    # noise.json
    store: LatentStore
    metadata_columns: list[str]     # columns joined from the audio folder's metadata
    query_id: str
    prompt: str | None
    query_audio: Path | None        # where the query's audio should be (it may be missing)

    @property
    def audio_folder(self) -> Path | None:
        folder = self.store.manifest.get("folder")
        return Path(folder) if folder else None

    @property
    def noise_floor(self) -> float | None:
        return (self.noise or {}).get("float_error")


def _json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportInputError(f"{path} is not valid JSON ({e.msg}); fix: rerun the stage that wrote it") from e


def read_scores(path: str | Path) -> tuple[Path, pd.DataFrame]:
    """(folder, table) of an attribution folder or of a ``scores.parquet`` file, sorted by rank."""
    p = Path(path)
    file = p / SCORES_FILE if p.is_dir() or not p.suffix else p
    if not file.exists():
        raise ReportInputError(f"{file} not found; fix: pass the out_dir of `musicattr attribute` (it holds "
                               f"{SCORES_FILE}) or the path of a {SCORES_FILE}")
    df = pd.read_parquet(file)
    try:
        check_scores_table(df, file, columns=[*READ_COLUMNS, "caption", "file_name"])
    except ScoresTableError as e:
        raise ReportInputError(f"{e}; for Eq. 1: rerun `musicattr attribute`") from e
    return file.parent, df.sort_values("rank", kind="mergesort").reset_index(drop=True)


def read_track_metadata(store: LatentStore) -> pd.DataFrame:
    """The audio folder's metadata (``metadata.jsonl`` or ``.csv``) keyed by file_name; only file_name
    when the store names no folder or the folder has no metadata file."""
    folder = store.manifest.get("folder")
    if not folder:
        return pd.DataFrame(columns=["file_name"])
    try:
        rows = read_metadata(folder)
    except MetadataError as e:
        log.warning("no track metadata: %s", e)
        return pd.DataFrame(columns=["file_name"])
    return pd.DataFrame(rows).drop_duplicates("file_name")


def _query_info(run: dict, query_audio: Path | None) -> dict[str, Any]:
    """The generate stage's record of the query: queries.json beside its audio, else the metadata of
    its ``.query.safetensors`` (named in run.json)."""
    meta = run.get("unlearned", {})
    if query_audio is not None:
        infos = _json(query_audio.parent / "queries.json") or []
        hit = [i for i in infos if i.get("audio") == query_audio.name]
        if hit:
            return hit[0]
    query = meta.get("query")
    if query and Path(query).exists():
        from safetensors import safe_open

        with safe_open(query, "pt") as f:
            return json.loads((f.metadata() or {}).get("info", "{}"))
    return {}


def resolve_query(run: dict, store: LatentStore, query_audio: str | None, prompt: str | None,
                  fallback_id: str | None) -> tuple[str, str | None, Path | None]:
    """(query id, prompt, audio path) of the attributed query.

    Given values win; otherwise a generated query's audio is ``qNNN.wav`` beside the
    ``qNNN.query.safetensors`` named in run.json, and a training item (train-to-train) is its own audio."""
    from musicattr.attribution.similar_candidates import query_audio as audio_of

    meta = run.get("unlearned", {})
    audio = Path(query_audio) if query_audio else audio_of(meta, store)
    qid = meta.get("query_id") or fallback_id or "query"
    item = meta.get("query_item")
    if item is not None and prompt is None:
        key = int(item) if str(item).isdigit() else item
        prompt = str(store.items.iloc[store.position_of(key)]["caption"])
    if prompt is None:
        info = _query_info(run, audio)
        prompt = info.get("caption") or info.get("prompt")
        if audio is None and info.get("audio") and meta.get("query"):
            audio = Path(meta["query"]).parent / info["audio"]
    return qid, prompt, audio


def open_store(path: str | None, run: dict, scores_dir: Path) -> LatentStore:
    path = path or run.get("store")
    if not path:
        raise ReportInputError(f"{scores_dir / 'run.json'} names no latent store; fix: pass --store")
    try:
        return LatentStore(path)
    except StoreError as e:
        raise ReportInputError(f"{e} (the store of the scores in {scores_dir}); fix: pass --store") from e


def load_query_inputs(scores: str | Path, query_audio: str | None = None, prompt: str | None = None,
                      store: str | None = None) -> QueryInputs:
    """Everything one query's report shows, read from the attribution folder ``scores``."""
    scores_dir, table = read_scores(scores)
    run = _json(scores_dir / "run.json") or {}
    if not run:
        log.warning("%s not found: the provenance of the scores is unknown", scores_dir / "run.json")
    s = open_store(store, run, scores_dir)
    meta = read_track_metadata(s)
    extra = [c for c in meta.columns if c not in table.columns]
    table = table.merge(meta[["file_name", *extra]], on="file_name", how="left")
    fallback = table["query_id"].iloc[0] if "query_id" in table and len(table) else None
    fallback = str(fallback) if fallback is not None and pd.notna(fallback) else None
    qid, prompt, audio = resolve_query(run, s, query_audio, prompt, fallback)
    return QueryInputs(scores_dir, table, run, _json(scores_dir / "noise.json"), s, extra, str(qid), prompt, audio)
