"""What a retrained model is measured on: its query losses, and for planted prompts its generation's chroma.

Both are cached in the retrain's folder per query, each entry with the key it was made with
(``losses.json``: the query's fingerprint, T, seed, M_L, the task; ``planted.json``: also the sampler
settings and the autoencoder), so a campaign over other queries reuses the retrain and measures only
what is missing. Planted generations are kept as ``planted-<query id>.wav`` to listen to.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from musicattr.atomic import atomic_write_json
from musicattr.counterfactual.queries import Query, query_losses, queries_fingerprint

if TYPE_CHECKING:
    from musicattr.data.latent_store import LatentStore


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _missing(cache: dict, keys: dict[str, dict]) -> list[str]:
    return [qid for qid, key in keys.items() if cache.get(qid, {}).get("key") != key]


def loss_keys(queries: list[Query], store: str, seed: int, num_draws: int, mask: bool, task) -> dict[str, dict]:
    """The key of each query's loss: what L(z_q, theta) depends on besides theta."""
    return {q.query_id: {"query": queries_fingerprint([q], store), "num_draws": num_draws, "seed": seed,
                         "mask_loss": mask, **task.identity()} for q in queries}


def planted_keys(queries: list[Query], store: str, settings: dict) -> dict[str, dict]:
    return {q.query_id: {"query": queries_fingerprint([q], store), **settings} for q in queries}


def cached(run_dir: Path, name: str, keys: dict[str, dict], field: str) -> dict[str, float] | None:
    """The cached values of ``keys``' queries in ``run_dir/name``, or None if any is missing or stale."""
    cache = _read(Path(run_dir) / name)
    return None if _missing(cache, keys) else {qid: cache[qid][field] for qid in keys}


def measure_losses(run_dir: Path, task, model, queries: list[Query], store: str, keys: dict[str, dict], seed: int,
                   num_draws: int, mask: bool, device: str) -> dict[str, float]:
    """L(z_q, theta_run) for each query, from ``losses.json`` or computed (``model`` is the run's theta)."""
    path = Path(run_dir) / "losses.json"
    cache = _read(path)
    todo = [q for q in queries if q.query_id in _missing(cache, keys)]
    if todo:
        losses = query_losses(task, model, todo, store, seed, num_draws, mask, device)
        cache.update({qid: {"key": keys[qid], "loss": v} for qid, v in losses.items()})
        atomic_write_json(path, cache)
    return {q.query_id: cache[q.query_id]["loss"] for q in queries}


def measure_planted(run_dir: Path, module, queries: list[Query], store: "LatentStore", keys: dict[str, dict],
                    steps: int, cfg_scale: float, seed: int) -> dict[str, float]:
    """Chroma similarity between a generation of the run's model from each planted prompt (the query's text
    embedding and duration, sampler seed ``seed``) and the planted original track."""
    from musicattr.models.health import chroma, chroma_similarity
    from musicattr.embeddings.audio import load_audio
    from musicattr.evaluation.common import store_folder
    from musicattr.models.autoencoder_module import store_autoencoder
    from musicattr.data.queries import load_query
    from musicattr.models.generate import sample_latents, write_generation

    path = Path(run_dir) / "planted.json"
    cache = _read(path)
    todo = [q for q in queries if q.query_id in _missing(cache, keys)]
    if todo:
        ae = store_autoencoder(store.manifest).to(module.device)
        sr = module.sample_rate
        for q in todo:
            info = load_query(q.query_file)
            z = sample_latents(module, info["text_emb"][None].float(), info["seconds_total"],
                               store.latent_shape[1], steps, cfg_scale, seed)
            with torch.no_grad():
                audio = ae.decode(z)[0, :, : int(info["duration_s"] * sr)].cpu()
            write_generation(Path(run_dir) / f"planted-{q.query_id}.wav", audio, sr)
            original, osr = load_audio(str(store_folder(store) / q.planted_group))
            original = original[..., : math.ceil(info["duration_s"] * osr)]
            value = chroma_similarity(chroma(audio.mean(0).numpy(), sr), chroma(original.mean(0).numpy(), osr))
            cache[q.query_id] = {"key": keys[q.query_id], "chroma": value}
            atomic_write_json(path, cache)
    return {q.query_id: cache[q.query_id]["chroma"] for q in queries}
