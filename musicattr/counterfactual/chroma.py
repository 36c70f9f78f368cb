"""Is the planted tune still generated? 12-bin chroma of a generation against the planted track.

    chroma_similarity(a, b) = mean over frames f of cos(C_a[:, f], C_b[:, f])

over the frames both clips share (aligned at their start), C the chroma (librosa ``chroma_stft``).
A local helper until ``musicattr.models.health`` (issue 8) lands with the same two functions; then this
module should import them from there.
"""
from __future__ import annotations

import numpy as np
import torch


def chroma(audio, sr: int, hop_length: int = 512) -> np.ndarray:
    """Chroma [12, frames] of mono-mixed audio ([T] or [C, T], tensor or array)."""
    import librosa

    x = audio.detach().cpu().numpy() if torch.is_tensor(audio) else np.asarray(audio)
    x = x.astype(np.float32)
    if x.ndim > 1:
        x = x.mean(axis=0)
    n_fft = min(2048, max(256, 1 << int(np.log2(max(len(x), 256)))))
    return librosa.feature.chroma_stft(y=x, sr=sr, n_fft=n_fft, hop_length=hop_length, tuning=0.0)


def chroma_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean frame-wise cosine of two chromagrams [12, frames] over their common frames."""
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n], b[:, :n]
    cos = (a * b).sum(0) / np.maximum(np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0), 1e-12)
    return float(cos.mean())
