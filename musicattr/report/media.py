"""The files a report page links: audio copied into its folder, spectrograms, the score plot.

Audio is transcoded with soundfile (any format it reads -> ``wav`` 16-bit PCM, ``flac``, ``ogg``
Vorbis or ``mp3``), at its own sample rate and channels, so the folder plays offline in a browser.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
                 "mp3": ("MP3", "MPEG_LAYER_III")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def read_audio(path: Path) -> tuple[np.ndarray | None, int, str]:
    """(samples [T, C] float32, sample rate, '') or (None, 0, why it cannot be read)."""
    import soundfile as sf

    if not path.exists():
        return None, 0, f"audio file not found: {path}"
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError by format
        return None, 0, f"audio file unreadable: {path} ({e})"
    if data.size == 0:
        return None, 0, f"audio file is empty: {path}"
    return data, int(sr), ""


def write_audio(data: np.ndarray, sr: int, dst_stem: Path, fmt: str) -> Path:
    """Write ``data`` [T, C] to ``dst_stem.<fmt>`` (samples clipped to [-1, 1]); returns the path."""
    import soundfile as sf

    if fmt not in AUDIO_FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; fix: choose one of {', '.join(AUDIO_FORMATS)}")
    major, subtype = AUDIO_FORMATS[fmt]
    dst = dst_stem.with_suffix(f".{fmt}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(dst), np.clip(data, -1.0, 1.0), sr, format=major, subtype=subtype)
    return dst


def spectrogram_png(data: np.ndarray, sr: int, path: Path, title: str = "", size=(8.0, 2.6)) -> Path:
    """Log-magnitude spectrogram (dB) of the channel mean, 0 Hz to Nyquist, as a PNG."""
    plt = _pyplot()
    mono = data.mean(axis=1)
    n_fft = 1024 if sr >= 16000 else 512
    fig, ax = plt.subplots(figsize=size)
    if len(mono) > n_fft:
        ax.specgram(mono, NFFT=n_fft, Fs=sr, noverlap=n_fft * 3 // 4, cmap="magma", scale="dB", vmin=-120)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Hz")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def scores_png(unlearning: np.ndarray, others: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """The query's score distribution as Figure 1 draws it (one query: no spread)."""
    import torch

    from musicattr.evaluation.figure1 import plot_figure1

    plot_figure1(torch.as_tensor(unlearning), {k: torch.as_tensor(v) for k, v in others.items()}, str(path), title)
    return path
