"""Representation health: does the autoencoder keep the music, and do latents differ between tracks?

Attribution on a collapsed representation is meaningless, so these figures are measured before any
GPU-hour is spent on it:

* chroma cosine: 12-bin chroma (librosa ``chroma_stft``) of a track x and of its reconstruction
  D(E(x)), mean frame-wise cosine over the non-silent frames of x. ``chroma_own`` averages it over the
  held-back tracks; ``chroma_other`` compares each reconstruction with another held-back track
  (the chance level); ``chroma_margin`` = own - other.
* ``mrstft``: multi-resolution STFT distance between x and D(E(x)) (auraloss; 0 is perfect).
* latent spread: sum_c Var_{i,t}(z_cit) / sum_c E_{i,t}[z_cit^2] over the non-padded frames t of
  the items i, per latent channel c. A collapsed encoder (every track mapped to nearly the same
  latent) gives ~0; a healthy one is of order 1.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

MIN_SPREAD = 0.1
MIN_CHROMA_MARGIN = 0.1
HEALTH_FILE = "health.json"  # the reconstruction report, beside an autoencoder's checkpoint or weights


def chroma(audio: np.ndarray, sample_rate: int, silence_db: float = -40.0) -> np.ndarray:
    """12 x frames chroma of mono audio (librosa chroma_stft, n_fft 2048, hop 512); frames quieter than
    ``silence_db`` below the loudest frame are zeroed (they carry no pitch, and chroma_stft would normalise
    their noise into one)."""
    import librosa

    y = np.asarray(audio, dtype=np.float32)
    c = librosa.feature.chroma_stft(y=y, sr=sample_rate, n_fft=2048, hop_length=512)
    rms = librosa.feature.rms(y=y, frame_length=2048, hop_length=512)[0][: c.shape[1]]
    active = rms > rms.max(initial=0.0) * 10 ** (silence_db / 20) if rms.size else rms.astype(bool)
    return c * active[None, :]


def chroma_similarity(query: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the query's non-silent frames t of cos(query_t, reference_t), time-aligned from the start;
    reference frames past its end (or silent) count as 0. 1 = the same pitch classes all along."""
    n = query.shape[1]
    r = np.zeros_like(query)
    m = min(n, reference.shape[1])
    r[:, :m] = reference[:, :m]
    qn, rn = np.linalg.norm(query, axis=0), np.linalg.norm(r, axis=0)
    active = qn > 0
    if not active.any():
        return 0.0
    cos = (query * r).sum(0)[active] / (qn[active] * rn[active] + 1e-8)
    return float(cos.mean())


def latent_spread(latents: Iterable[torch.Tensor]) -> float:
    """sum_c Var(z_c) / sum_c E[z_c^2] over all given latent frames; ``latents`` yields [C, frames] tensors
    (the non-padded frames of each item)."""
    total, total_sq, count = None, None, 0
    for z in latents:
        z = z.double()
        s, sq = z.sum(1), z.pow(2).sum(1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += z.shape[1]
    if not count:
        raise ValueError("no latent frames to measure")
    mean, mean_sq = total / count, total_sq / count
    return float((mean_sq - mean.pow(2)).sum() / mean_sq.sum().clamp_min(1e-30))


@torch.no_grad()
def reconstruction_health(autoencoder, tracks: Sequence[torch.Tensor], sample_rate: int) -> dict:
    """Chroma cosine (own vs another track) and MR-STFT distance of D(E(x)) on mono tracks [1, T]."""
    import auraloss

    if len(tracks) < 2:
        raise ValueError("the reconstruction check needs at least 2 held-back tracks")
    stft = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=[2048, 512, 128], hop_sizes=[512, 128, 32],
                                                 win_lengths=[2048, 512, 128])
    ratio = autoencoder.downsampling_ratio
    originals, recons, dists = [], [], []
    device = next(autoencoder.parameters()).device
    for x in tracks:
        n = max(ratio, x.shape[-1] // ratio * ratio)
        x = torch.nn.functional.pad(x[..., :n], (0, max(0, n - x.shape[-1])))
        y = autoencoder.decode(autoencoder.encode_mean(x[None].to(device)))[0].cpu()[..., :n]
        dists.append(float(stft(y[None], x[None])))
        originals.append(chroma(x[0].numpy(), sample_rate))
        recons.append(chroma(y[0].numpy(), sample_rate))
    own = [chroma_similarity(o, r) for o, r in zip(originals, recons)]
    other = [chroma_similarity(originals[(i + 1) % len(recons)], r) for i, r in enumerate(recons)]
    report = {"tracks": len(tracks), "chroma_own": float(np.mean(own)), "chroma_other": float(np.mean(other)),
              "mrstft": float(np.mean(dists))}
    report["chroma_margin"] = report["chroma_own"] - report["chroma_other"]
    return report


def check_spread(spread: float, source: str) -> bool:
    """Warn (and return False) when the latents have collapsed."""
    if spread >= MIN_SPREAD:
        return True
    log.warning("latent spread %.4f < %.1f: the autoencoder %s maps every track to nearly the same latent "
                "(collapsed). Attribution on these latents measures noise; fix: train the autoencoder longer or "
                "with a smaller kl_weight, or use another checkpoint, before running fit/fisher/attribute.",
                spread, MIN_SPREAD, source)
    return False


def check_reconstruction(report: dict, source: str) -> bool:
    """Warn (and return False) when reconstructions keep no more pitch content than another track has."""
    if report["chroma_margin"] >= MIN_CHROMA_MARGIN:
        return True
    log.warning("the autoencoder %s keeps little pitch: chroma cosine %.3f against its own track vs %.3f against "
                "another track. fix: train it longer, or use an autoencoder that keeps the music.",
                source, report["chroma_own"], report["chroma_other"])
    return False


def record_store_health(store_root, autoencoder: str | None = None, use_wandb: bool = True) -> dict:
    """Measure the latent spread of a finished store (non-padded frames of every item), add it and the
    autoencoder's reconstruction report (``health.json`` beside its checkpoint, when there is one) to the
    store's manifest under ``health``, and warn when the representation has collapsed."""
    import json
    from pathlib import Path

    from musicattr.atomic import atomic_write_text
    from musicattr.data.latent_store import LatentStore

    store = LatentStore(store_root)
    items = (store[i] for i in range(len(store)))
    frames = (it["latents"][:, : max(1, it["valid_frames"])] for it in items)
    health: dict = {"latent_spread": latent_spread(frames), "items": len(store)}
    check_spread(health["latent_spread"], str(autoencoder or store_root))
    beside = Path(autoencoder).with_name(HEALTH_FILE) if autoencoder else None
    if beside is not None and beside.exists():
        health["reconstruction"] = json.loads(beside.read_text())
    manifest_path = Path(store_root) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["health"] = health
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    if use_wandb:
        _log_wandb(health, str(store_root))
    rec = health.get("reconstruction")
    log.info("latent store health: spread %.3f%s", health["latent_spread"],
             f", reconstruction chroma {rec['chroma_own']:.3f} vs {rec['chroma_other']:.3f} for another track"
             if rec else " (no reconstruction report beside the autoencoder)")
    return health


def _log_wandb(health: dict, store_root: str) -> None:
    """The store's health figures in an (offline by default) wandb run of their own."""
    from musicattr.wandb_logger import open_wandb

    run = open_wandb("encode-health", {"store": store_root})
    if run is None:
        return
    rec = health.get("reconstruction") or {}
    run.log({"health/latent_spread": health["latent_spread"],
             **{f"health/{k}": v for k, v in rec.items() if isinstance(v, float)}})
    run.finish()
