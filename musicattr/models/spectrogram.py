"""Log-mel front end of the demo autoencoder, and its inverse by Griffin-Lim (the AudioLDM route).

    S = |STFT(x)| (n_fft, hop),   M = W_mel S,   m = (log max(M, floor) - offset) / scale

The autoencoder (SAT's AudioAutoencoder with Oobleck encoder/decoder over the n_mels channels)
compresses m; decoding inverts the normalisation, maps mel magnitudes back to linear frequency
with the pseudo-inverse of W_mel (clamped at 0) and recovers a phase with Griffin-Lim
(torchaudio). No pretrained vocoder loads offline, and Griffin-Lim keeps pitch and rhythm.
"""
from __future__ import annotations

import math

import torch
import torchaudio


class LogMel(torch.nn.Module):
    """Mono audio [B, 1, T] <-> normalised log-mel [B, n_mels, T // hop_length]."""

    def __init__(self, sample_rate: int, n_fft: int = 2048, hop_length: int = 512, n_mels: int = 128,
                 f_min: float = 0.0, f_max: float | None = None, floor: float = 1e-3, offset: float = 0.0,
                 scale: float = 2.5, griffin_lim_iters: int = 32):
        super().__init__()
        self.sample_rate, self.hop_length, self.n_mels = int(sample_rate), int(hop_length), int(n_mels)
        self.floor, self.offset, self.scale = float(floor), float(offset), float(scale)
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                        n_mels=n_mels, f_min=f_min, f_max=f_max, power=1.0)
        self.griffin_lim = torchaudio.transforms.GriffinLim(n_fft=n_fft, hop_length=hop_length, power=1.0,
                                                            n_iter=griffin_lim_iters, rand_init=False)
        self.register_buffer("mel_pinv", torch.linalg.pinv(self.mel.mel_scale.fb.T), persistent=False)

    @property
    def silence(self) -> float:
        """The normalised value of a silent (zero-padded) frame."""
        return (math.log(self.floor) - self.offset) / self.scale

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"the log-mel front end takes mono audio [B, 1, T], got {tuple(audio.shape)}; "
                             "fix: set audio_channels: 1 in the autoencoder config")
        frames = audio.shape[-1] // self.hop_length
        m = self.mel(audio[:, 0].float())[..., :frames]
        return (m.clamp_min(self.floor).log() - self.offset) / self.scale

    @torch.no_grad()
    def inverse(self, logmel: torch.Tensor) -> torch.Tensor:
        """Audio [B, 1, frames * hop_length] from normalised log-mel [B, n_mels, frames]."""
        mel = (logmel.float() * self.scale + self.offset).exp()
        linear = (self.mel_pinv.to(mel) @ mel).clamp_min(0.0)
        audio = self.griffin_lim(linear)
        n = logmel.shape[-1] * self.hop_length
        audio = torch.nn.functional.pad(audio, (0, max(0, n - audio.shape[-1])))[..., :n]
        return audio[:, None]
