"""Similarity-based (black-box) attribution baselines of Section 3.3.

Both score a query track (e.g. a generated sample) against every training track from segment
embeddings (10 s windows, 1 s hop; see :mod:`musicattr.embeddings.audio`):

* :func:`all_against_all` -- cosine similarity over all pairs (query segment, training segment);
  a training track's score is the maximum.
* :func:`average` -- cosine similarity of the time-averaged embeddings.

Training embeddings are stored once on disk (:func:`compute_train_embeddings`) as one flat
segment matrix plus per-item offsets, and read back memory-mapped (:func:`load_train_embeddings`),
so scoring runs in chunks over segments and scales to ~100k tracks.
:func:`similarity_table` lays the scores out like the unlearning scorer's table.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from musicattr.atomic import atomic_dir
from musicattr.attribution.scores_table import COLUMNS, scores_table

if TYPE_CHECKING:
    import pandas

log = logging.getLogger(__name__)
__all__ = [
    "TrainEmbeddings",
    "all_against_all",
    "average",
    "compute_train_embeddings",
    "load_train_embeddings",
    "store_audio_embeddings",
    "similarity_table",
    "TABLE_COLUMNS",
]

TABLE_COLUMNS = COLUMNS  # the one scores-table schema

_SEGMENTS_FILE = "segments.bin"
_OFFSETS_FILE = "offsets.npy"
_META_FILE = "meta.json"


@dataclass
class TrainEmbeddings:
    """Flat segment embeddings of N training tracks.

    ``segments``: Tensor[total_segments, D] (possibly a read-only memory map, float16 or float32);
    item i owns rows ``offsets[i]:offsets[i+1]``."""

    segments: Tensor
    offsets: Tensor
    item_ids: list[str]
    encoder_name: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def item(self, i: int) -> Tensor:
        return self.segments[int(self.offsets[i]):int(self.offsets[i + 1])].float()

    def track_means(self, chunk_rows: int = 262144) -> Tensor:
        """Time-averaged embedding per item: Tensor[N, D] float32."""
        return _segment_means(self.segments, self.offsets, chunk_rows)


# ------------------------------------------------------------------------------------------
# input normalisation
# ------------------------------------------------------------------------------------------

def _flat(train, lengths: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """Any supported training-embedding layout -> (segments Tensor[total, D], offsets Tensor[N+1])."""
    if isinstance(train, TrainEmbeddings):
        return train.segments, train.offsets.long()
    if isinstance(train, Tensor) and train.dim() == 3:  # padded [N, S, D]
        n, s, _ = train.shape
        lens = torch.full((n,), s, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long()
        if lens.numel() != n or (lens < 1).any() or (lens > s).any():
            raise ValueError("lengths must hold one value in [1, S] per item")
        mask = torch.arange(s)[None, :] < lens[:, None]
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        return train[mask], offsets
    if isinstance(train, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths is only used with a padded [N, S, D] tensor")
        if len(train) == 0:
            raise ValueError("no training items")
        items = [torch.as_tensor(t).reshape(-1, torch.as_tensor(t).shape[-1]) for t in train]
        if any(t.shape[0] == 0 for t in items):
            raise ValueError("every training item needs at least one segment")
        lens = torch.tensor([t.shape[0] for t in items], dtype=torch.long)
        offsets = torch.zeros(len(items) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        return torch.cat([t.float() for t in items]), offsets
    raise TypeError("train_segments must be a list of Tensor[S_i, D], a padded Tensor[N, S, D] (+ lengths) "
                    "or TrainEmbeddings")


def _owner(offsets: Tensor) -> Tensor:
    """Item index of every segment row."""
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])


def _segment_means(segments: Tensor, offsets: Tensor, chunk_rows: int = 262144) -> Tensor:
    n = offsets.numel() - 1
    owner = _owner(offsets)
    sums = torch.zeros(n, segments.shape[1], dtype=torch.float64)
    for a in range(0, segments.shape[0], chunk_rows):
        b = min(a + chunk_rows, segments.shape[0])
        sums.index_add_(0, owner[a:b], torch.as_tensor(segments[a:b]).double())
    return (sums / (offsets[1:] - offsets[:-1]).clamp_min(1)[:, None].double()).float()


# ------------------------------------------------------------------------------------------
# scorers
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def all_against_all(query_segments: Tensor, train_segments, lengths=None, chunk_rows: int = 65536) -> Tensor:
    """Max over all (query segment, training segment) cosine similarities, per training item.

    ``query_segments``: Tensor[Sq, D]; ``train_segments``: list of Tensor[S_i, D], a padded
    Tensor[N, S, D] with ``lengths`` (padding ignored), or :class:`TrainEmbeddings`.
    Returns Tensor[N] float32. Runs in chunks of ``chunk_rows`` training segments."""
    q = torch.as_tensor(query_segments).float()
    q = F.normalize(q.reshape(-1, q.shape[-1]), dim=1)
    segs, offsets = _flat(train_segments, lengths)
    if segs.shape[-1] != q.shape[1]:
        raise ValueError(f"embedding dims differ: query {q.shape[1]}, train {segs.shape[-1]}")
    owner = _owner(offsets)
    n = offsets.numel() - 1
    out = torch.full((n,), -math.inf)
    for a in range(0, segs.shape[0], chunk_rows):
        b = min(a + chunk_rows, segs.shape[0])
        t = F.normalize(torch.as_tensor(segs[a:b]).float(), dim=1)
        best = (t @ q.T).amax(dim=1)  # [rows]
        out.scatter_reduce_(0, owner[a:b], best, reduce="amax", include_self=True)
    return out


@torch.no_grad()
def average(query_segments: Tensor, train_segments, lengths=None, chunk_rows: int = 262144) -> Tensor:
    """Cosine similarity between the time-averaged query embedding and each training item's
    time-averaged embedding. Same inputs as :func:`all_against_all`; returns Tensor[N] float32."""
    q = torch.as_tensor(query_segments).float()
    q = q.reshape(-1, q.shape[-1]).mean(0)
    segs, offsets = _flat(train_segments, lengths)
    means = _segment_means(segs, offsets, chunk_rows)
    return F.cosine_similarity(means, q[None, :], dim=1).float()


# ------------------------------------------------------------------------------------------
# on-disk store
# ------------------------------------------------------------------------------------------

def _encoder_config(encoder) -> dict:
    """What the stored embeddings depend on: the encoder, its weights (checkpoint fingerprint) and segmenting."""
    from musicattr.fingerprint import file_fingerprint

    checkpoint = getattr(encoder, "checkpoint", None)
    return {"encoder": encoder.name, "dim": int(encoder.dim), "sample_rate": int(encoder.sample_rate),
            "segment_seconds": float(encoder.segment_seconds), "hop_seconds": float(encoder.hop_seconds),
            "checkpoint_fingerprint": file_fingerprint(checkpoint) if checkpoint else None}


def store_audio_embeddings(store, encoder) -> TrainEmbeddings:
    """Segment embeddings of every training track of a latent store (its audio folder, each track cropped to the
    model's length: max_frames x downsampling_ratio / sample_rate seconds), computed once and kept in
    ``<store>/audio_embeddings/<encoder>`` (:func:`compute_train_embeddings` reuses a matching one)."""
    from pathlib import Path

    from musicattr.embeddings.audio import load_audio

    m = store.manifest
    folder, limit = Path(m["folder"]), m["max_frames"] * m["downsampling_ratio"] / m["sample_rate"]

    def items():
        for r in store.items.itertuples():
            audio, sr = load_audio(str(folder / r.file_name))
            yield r.item_id, audio, sr, min(audio.shape[-1], int(limit * sr))

    path = store.root / "audio_embeddings" / encoder.name
    return compute_train_embeddings(items(), encoder, str(path), item_ids=list(store.items["item_id"]), progress=True)


def load_train_embeddings(path: str, mmap: bool = True) -> TrainEmbeddings:
    """Read a store written by :func:`compute_train_embeddings` (segments memory-mapped by default)."""
    with open(os.path.join(path, _META_FILE)) as f:
        meta = json.load(f)
    shape = tuple(meta["shape"])
    arr = np.memmap(os.path.join(path, _SEGMENTS_FILE), dtype=meta["dtype"], mode="c" if mmap else "r",
                    shape=shape)
    if not mmap:
        arr = np.array(arr)
    offsets = torch.from_numpy(np.load(os.path.join(path, _OFFSETS_FILE))).long()
    return TrainEmbeddings(torch.from_numpy(arr), offsets, list(meta["item_ids"]), meta["encoder"], meta)


def compute_train_embeddings(items: Iterable[tuple[str, Tensor, int, int | None]], encoder, path: str,
                             item_ids: Sequence[str] | None = None, overwrite: bool = False,
                             dtype: str = "float16", progress: bool = False) -> TrainEmbeddings:
    """Embed every training track once and store the segments under directory ``path``.

    ``items`` yields ``(item_id, audio Tensor[C, T], sample_rate, valid_samples or None)``;
    ``encoder`` is an :class:`~musicattr.embeddings.audio.AudioEncoder`. An existing store is reused
    (without touching ``items``) when its encoder name, checkpoint (``encoder.checkpoint``, by content
    fingerprint) and segmenting match and, if ``item_ids`` is
    given, it holds exactly those ids in that order; otherwise it is recomputed. Files:
    ``segments.bin`` (raw ``dtype`` matrix [total_segments, D]), ``offsets.npy`` (int64 [N+1]),
    ``meta.json`` (encoder config, item ids, shape, dtype). Written to a temporary folder, then renamed."""
    cfg = _encoder_config(encoder)
    if not overwrite and os.path.isfile(os.path.join(path, _META_FILE)):
        try:
            old = load_train_embeddings(path)
            same = all(old.meta.get(k) == v for k, v in cfg.items())
            if same and (item_ids is None or list(item_ids) == old.item_ids):
                return old
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass
    with atomic_dir(path) as tmp:
        _write_train_embeddings(items, encoder, tmp, item_ids, dtype, progress, cfg)
    return load_train_embeddings(path)


def _write_train_embeddings(items, encoder, tmp, item_ids, dtype: str, progress: bool, cfg: dict) -> None:
    ids: list[str] = []
    offsets = [0]
    np_dtype = np.dtype(dtype)
    with open(os.path.join(tmp, _SEGMENTS_FILE), "wb") as f:
        for k, (item_id, audio, sr, valid) in enumerate(items):
            e = encoder.embed_segments(audio, sr, valid)
            f.write(e.float().numpy().astype(np_dtype).tobytes())
            ids.append(str(item_id))
            offsets.append(offsets[-1] + e.shape[0])
            if progress and (k + 1) % 100 == 0:
                log.info("[similarity] embedded %d tracks (%d segments)", k + 1, offsets[-1])
    if not ids:
        raise ValueError("no training items to embed")
    if item_ids is not None and list(map(str, item_ids)) != ids:
        raise ValueError("item ids yielded by `items` differ from `item_ids`")
    np.save(os.path.join(tmp, _OFFSETS_FILE), np.asarray(offsets, dtype=np.int64))
    meta = dict(cfg, item_ids=ids, shape=[offsets[-1], int(encoder.dim)], dtype=np_dtype.name)
    with open(os.path.join(tmp, _META_FILE), "w") as f:
        json.dump(meta, f)


# ------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------

def similarity_table(scores: Tensor, items: Sequence[dict], method: str = "similarity",
                     query_id: str | None = None) -> "pandas.DataFrame":
    """Scores -> the scores-table schema (:data:`TABLE_COLUMNS`, :mod:`musicattr.attribution.scores_table`),
    sorted by rank.

    ``items[i]`` describes training item i (keys ``item_id``, optional ``index`` (default i),
    ``caption``, ``file_name``, ``duration_s``, ``valid_frames``; missing ``valid_frames`` -> <NA>).
    Rank 1 = highest score; ties by index. ``baseline_loss`` / ``unlearned_loss`` are NaN for similarity
    methods, ``score_se`` 0 (a similarity is computed, not estimated from random draws).
    ``method`` e.g. ``"similarity/all-against-all[aisfx]"``."""
    s = torch.as_tensor(scores).detach().cpu().double().numpy().reshape(-1)
    if len(items) != s.size:
        raise ValueError(f"{s.size} scores but {len(items)} items")
    return scores_table(list(items), s, method, query_id, score_se=np.zeros(s.size))
