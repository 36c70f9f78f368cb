"""Audio encoders for similarity-based attribution, target selection and Frechet distances.

Every encoder cuts a track into ``segment_seconds`` windows with a hop of ``hop_seconds``
(10 s / 1 s as in Section 3.3 of the paper) and returns one embedding per segment
(:meth:`AudioEncoder.embed_segments`) or their time average (:meth:`AudioEncoder.embed_track`).
Only the non-padded part of a track (``valid_samples``) is embedded; a track shorter than one
segment yields exactly one (shorter) segment.

Encoders:

* ``"aisfx"`` (:class:`AisfxEncoder`, the offline default): the pretrained *X-Sequential-CE* CNN of
  the ``aisfx`` pip package (Ma et al., ISMIR 2021; weights ship inside the wheel, nothing is
  downloaded). It embeds 100-frame log-mel blocks (about 2.32 s at 44.1 kHz) into 512-d vectors;
  a segment's embedding is the mean of the block embeddings it contains. It was trained on
  sound-effect libraries, so it is timbre-sensitive rather than a music-semantic model like CLAP.
* ``"clap"`` (:class:`ClapAudioEncoder`): the laion-clap audio branch (the paper's encoder); needs a
  local checkpoint file.
* ``"openl3"`` (:class:`OpenL3Encoder`): optional, needs the ``openl3`` package (its install downloads
  weights, so it is not available offline).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AudioEncoder",
    "AisfxEncoder",
    "ClapAudioEncoder",
    "OpenL3Encoder",
    "segment_bounds",
    "load_audio",
    "build_audio_encoder",
    "AUDIO_ENCODERS",
    "DEFAULT_AUDIO_ENCODER",
]

DEFAULT_AUDIO_ENCODER = "aisfx"


def load_audio(path: str) -> tuple[Tensor, int]:
    """Read an audio file with soundfile; returns (Tensor[C, T] float32, sample_rate)."""
    import soundfile as sf

    data, sr = sf.read(path, dtype="float32", always_2d=True)  # [T, C]
    return torch.from_numpy(data.T.copy()), int(sr)


def segment_bounds(
    valid_samples: int, sample_rate: int, segment_seconds: float, hop_seconds: float
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of the segments covering ``valid_samples``.

    Segments are ``segment_seconds`` long with a ``hop_seconds`` hop and lie fully inside the valid
    audio; a track shorter than one segment gives a single segment ``[0, valid_samples)``. A tail
    shorter than one hop after the last full segment is not covered (at most ``hop_seconds``).
    """
    if valid_samples <= 0:
        raise ValueError("valid_samples must be positive")
    seg = int(round(segment_seconds * sample_rate))
    hop = int(round(hop_seconds * sample_rate))
    if seg <= 0 or hop <= 0:
        raise ValueError("segment_seconds and hop_seconds must be positive")
    if valid_samples <= seg:
        return [(0, valid_samples)]
    n = 1 + (valid_samples - seg) // hop
    return [(i * hop, i * hop + seg) for i in range(n)]


class AudioEncoder:
    """Base class: subclasses set ``name``, ``sample_rate``, ``dim``, ``mono`` and implement
    :meth:`_embed_prepared` (audio already resampled/mixed, cut to the valid samples)."""

    name: str = "base"
    sample_rate: int = 44100
    dim: int = 0
    mono: bool = True

    def __init__(self, segment_seconds: float = 10.0, hop_seconds: float = 1.0):
        self.segment_seconds = float(segment_seconds)
        self.hop_seconds = float(hop_seconds)

    # -- preparation -----------------------------------------------------------------------
    def prepare(self, audio: Tensor, sample_rate: int | None = None,
                valid_samples: int | None = None) -> Tensor:
        """Cut to ``valid_samples`` (counted at ``sample_rate``), resample to ``self.sample_rate``
        and mix to mono if the encoder wants mono. Returns Tensor[C', T'] float32."""
        audio = torch.as_tensor(audio).detach().float().cpu()
        if audio.dim() == 1:
            audio = audio.unsqueeze(0)
        if audio.dim() != 2:
            raise ValueError(f"audio must be [C, T] (or [T]), got shape {tuple(audio.shape)}")
        sr = self.sample_rate if sample_rate is None else int(sample_rate)
        if valid_samples is not None:
            audio = audio[:, : int(valid_samples)]
        if audio.shape[-1] == 0:
            raise ValueError("no valid audio samples to embed")
        if self.mono and audio.shape[0] > 1:
            audio = audio.mean(dim=0, keepdim=True)
        if sr != self.sample_rate:
            import torchaudio.functional as AF

            audio = AF.resample(audio, sr, self.sample_rate)
        return audio.contiguous()

    # -- public API ------------------------------------------------------------------------
    @torch.no_grad()
    def embed_segments(self, audio: Tensor, sample_rate: int | None = None,
                       valid_samples: int | None = None) -> Tensor:
        """Tensor[C, T] (at ``sample_rate``, default ``self.sample_rate``) -> Tensor[n_segments, dim].

        ``valid_samples`` (at the input rate) marks the end of the real audio; padding after it is
        ignored."""
        x = self.prepare(audio, sample_rate, valid_samples)
        bounds = segment_bounds(x.shape[-1], self.sample_rate, self.segment_seconds, self.hop_seconds)
        out = self._embed_prepared(x, bounds)
        assert out.shape == (len(bounds), self.dim), (out.shape, len(bounds), self.dim)
        return out.float()

    @torch.no_grad()
    def embed_track(self, audio: Tensor, sample_rate: int | None = None,
                    valid_samples: int | None = None) -> Tensor:
        """Time average of :meth:`embed_segments`: Tensor[dim]."""
        return self.embed_segments(audio, sample_rate, valid_samples).mean(dim=0)

    def embed_file(self, path: str) -> Tensor:
        """Segments of an audio file (read with soundfile)."""
        audio, sr = load_audio(path)
        return self.embed_segments(audio, sr)

    def _embed_prepared(self, audio: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, sample_rate={self.sample_rate}, dim={self.dim}, "
                f"segment_seconds={self.segment_seconds}, hop_seconds={self.hop_seconds})")


# ------------------------------------------------------------------------------------------
# aisfx (default, offline)
# ------------------------------------------------------------------------------------------

class AisfxEncoder(AudioEncoder):
    """Pretrained aiSFX *X-Sequential-CE* embedding CNN (512-d), weights from the ``aisfx`` wheel.

    Front end re-implemented in torch after ``aisfx.spectrogram.spectrogram_librosa`` (verified
    against librosa in the tests): the valid audio of the whole track is peak-normalised, then a
    96-band HTK mel power spectrogram (Hann 2048, hop 1024, unit-sum filters, 0-22.05 kHz) is
    compressed with ``log10(1e4 * x + 1)`` and min-max scaled with the package's ``'original'``
    constants (0, 9.4578). Blocks of 100 frames (about 2.32 s) are embedded; blocks start every
    ``block_hop_seconds`` inside each segment (shared between overlapping segments) and a segment's
    embedding is the mean of its blocks. Audio shorter than one block is zero-padded in the
    spectrogram (as aisfx does).
    """

    name = "aisfx"
    sample_rate = 44100
    dim = 512
    mono = True
    n_fft = 2048
    hop_length = 1024
    n_mels = 96
    block_frames = 100
    spec_max = 9.457798957824707

    def __init__(self, segment_seconds: float = 10.0, hop_seconds: float = 1.0,
                 block_hop_seconds: float = 1.0, batch_size: int = 32, device: str | torch.device = "cpu"):
        super().__init__(segment_seconds, hop_seconds)
        try:
            import aisfx.inference as aisfx_inference
            from aisfx.models.cnn2d import EmbeddingNet
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "The default audio encoder needs the 'aisfx' package (pretrained weights ship in the wheel): "
                "pip install --no-deps aisfx==0.1.2") from e
        self.block_hop_seconds = float(block_hop_seconds)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.weights_path = aisfx_inference.get_path_modelWeights()
        if not os.path.isfile(self.weights_path):  # pragma: no cover
            raise FileNotFoundError(f"aisfx weights missing from the package: {self.weights_path}")
        # The file is the package's own (state_dict, {dataset: (idx, n_classes)}) pickle whose ints are
        # numpy scalars, so it needs weights_only=False (trusted: it ships inside the installed wheel).
        state, _datasets = torch.load(self.weights_path, map_location="cpu", weights_only=False)
        net = EmbeddingNet("max", 3, 1, 64)
        prefix = "embedding_net."
        net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        self.net = net.eval().to(self.device)
        self.window = torch.hann_window(self.n_fft, periodic=True)
        self.mel_fb = self._mel_filterbank()  # [n_freq, n_mels]

    # HTK mel filterbank, each filter normalised to unit sum (librosa norm=1.0 / essentia 'unit_sum').
    def _mel_filterbank(self) -> Tensor:
        import torchaudio.functional as AF

        fb = AF.melscale_fbanks(self.n_fft // 2 + 1, 0.0, self.sample_rate / 2.0, self.n_mels,
                                self.sample_rate, norm=None, mel_scale="htk").double()
        return (fb / fb.sum(dim=0, keepdim=True).clamp_min(1e-12)).float()

    def spectrogram(self, mono: Tensor) -> Tensor:
        """Tensor[T] (44.1 kHz) -> normalised log-mel Tensor[frames, 96] (aisfx input layout)."""
        y = mono.float()
        peak = y.abs().max()
        if peak > 0:
            y = y / peak
        pad = self.n_fft // 2  # librosa center=True with its default constant (zero) padding
        y = F.pad(y.view(1, 1, -1), (pad, pad), mode="constant").view(-1)
        spec = torch.stft(y, self.n_fft, self.hop_length, window=self.window, center=False,
                          return_complex=True).abs().pow(2)  # [freq, frames]
        mel = self.mel_fb.T @ spec  # [96, frames]
        mel = torch.log10(mel * 1e4 + 1.0) / self.spec_max
        return mel.T.contiguous()

    def embed_blocks(self, blocks: Tensor) -> Tensor:
        """Tensor[B, 100, 96] -> Tensor[B, 512]."""
        outs = []
        for i in range(0, blocks.shape[0], self.batch_size):
            outs.append(self.net(blocks[i:i + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.dim)

    def _embed_prepared(self, audio: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
        spec = self.spectrogram(audio[0])
        n_frames = spec.shape[0]
        spec = torch.cat([spec, spec.new_zeros(self.block_frames, spec.shape[1])])  # zero pad
        block_hop = int(round(self.block_hop_seconds * self.sample_rate))
        block_len = self.block_frames * self.hop_length
        starts: dict[int, int] = {}  # start frame -> row in the block batch
        seg_rows: list[list[int]] = []
        for s, e in bounds:
            rows = []
            b = s
            while True:
                f = int(round(b / self.hop_length))
                if f not in starts:
                    starts[f] = len(starts)
                rows.append(starts[f])
                b += block_hop
                if b + block_len > e or int(round(b / self.hop_length)) >= n_frames:
                    break
            seg_rows.append(rows)
        frames = torch.tensor(sorted(starts, key=starts.get))
        idx = frames[:, None] + torch.arange(self.block_frames)[None, :]
        emb = self.embed_blocks(spec[idx])  # [n_blocks, 512]
        return torch.stack([emb[r].mean(dim=0) for r in seg_rows])


# ------------------------------------------------------------------------------------------
# CLAP (paper's encoder; needs a local checkpoint)
# ------------------------------------------------------------------------------------------

_CLAP_HELP = (
    "ClapAudioEncoder needs a local laion-clap checkpoint file (model hubs are not reachable here). "
    "Get one on a machine with network access, e.g. the music checkpoint "
    "'music_audioset_epoch_15_esc_90.14.pt' (amodel='HTSAT-base') from "
    "https://huggingface.co/lukewys/laion_clap/tree/main, or '630k-audioset-best.pt' "
    "(amodel='HTSAT-tiny'), copy it here and pass its path as checkpoint=..."
)


def _roberta_base_offline() -> "torch.nn.Module":
    """roberta-base architecture built from its config (no download); weights come from the CLAP checkpoint."""
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return RobertaModel(cfg, add_pooling_layer=True)


def _hf_offline() -> None:
    """Put the Hugging Face hub into offline mode before laion-clap is imported.

    ``import laion_clap`` builds roberta tokenizers at import time and retries downloads for >10 min
    unless offline mode is on. The env var only takes effect if huggingface_hub is not imported yet
    (torchmetrics / transformers may have imported it already), so the module constant is set too.
    An explicit ``HF_HUB_OFFLINE=0`` in the environment is respected."""
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ["HF_HUB_OFFLINE"].strip().lower() not in ("1", "true", "yes", "on"):
        return
    consts = sys.modules.get("huggingface_hub.constants")
    if consts is not None:
        consts.HF_HUB_OFFLINE = True


def build_clap_model(amodel: str = "HTSAT-base", tmodel: str = "roberta", device: str = "cpu"):
    """Build the (non-fusion) laion-clap CLAP model offline, without weights. Returns (model, cfg).

    ``import laion_clap`` hangs for minutes retrying downloads unless ``HF_HUB_OFFLINE=1``; it is set
    (if unset) before the lazy import. The roberta text branch is built from its config instead of
    ``from_pretrained`` so that construction needs no network."""
    _hf_offline()
    try:
        from laion_clap.clap_module import create_model
        import laion_clap.clap_module.model as clap_model_mod
    except ImportError as e:  # pragma: no cover
        raise ImportError("ClapAudioEncoder needs laion-clap: pip install laion-clap==1.1.7") from e

    orig = clap_model_mod.RobertaModel

    class _OfflineRoberta:
        @staticmethod
        def from_pretrained(*_a, **_k):
            return _roberta_base_offline()

    clap_model_mod.RobertaModel = _OfflineRoberta
    try:
        model, cfg = create_model(amodel, tmodel, precision="fp32", device=device, enable_fusion=False)
    finally:
        clap_model_mod.RobertaModel = orig
    return model, cfg


class ClapAudioEncoder(AudioEncoder):
    """laion-clap audio branch (48 kHz mono, 10 s input windows, 512-d L2-normalised embeddings).

    ``checkpoint`` is a local laion-clap ``.pt`` file (required: nothing is downloaded). Audio is
    int16-quantised as in ``CLAP_Module.get_audio_embedding_from_data``; segments shorter than 10 s
    (short tracks) are repeat-padded by laion-clap's ``get_audio_features``.
    """

    name = "clap"
    sample_rate = 48000
    dim = 512
    mono = True

    def __init__(self, checkpoint: str | None, amodel: str = "HTSAT-base", segment_seconds: float = 10.0,
                 hop_seconds: float = 1.0, batch_size: int = 8, device: str = "cpu"):
        super().__init__(segment_seconds, hop_seconds)
        if not checkpoint:
            raise FileNotFoundError("No CLAP checkpoint given. " + _CLAP_HELP)
        checkpoint = os.path.expanduser(str(checkpoint))
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"CLAP checkpoint not found: {checkpoint!r}. " + _CLAP_HELP)
        self.checkpoint = checkpoint
        self.amodel = amodel
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        model, cfg = build_clap_model(amodel, device=str(self.device))
        self.audio_cfg = cfg["audio_cfg"]
        if int(self.audio_cfg["sample_rate"]) != self.sample_rate:  # pragma: no cover
            raise ValueError(f"unexpected CLAP sample rate {self.audio_cfg['sample_rate']}")
        self._load_checkpoint(model, checkpoint)
        self.model = model.eval()
        self.dim = int(model.audio_projection[-1].out_features)

    @staticmethod
    def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        audio_prefixes = ("audio_branch", "audio_projection")
        audio_missing = [k for k in missing if k.startswith(audio_prefixes)]
        audio_unexpected = [k for k in unexpected if k.startswith(audio_prefixes)]
        if audio_missing or audio_unexpected:
            raise RuntimeError(
                f"{path!r} does not match the CLAP audio architecture (wrong amodel for this checkpoint? "
                f"the music checkpoint needs amodel='HTSAT-base', 630k-* need 'HTSAT-tiny'): "
                f"missing {audio_missing[:5]}, unexpected {audio_unexpected[:5]}")
        if missing or unexpected:  # text branch only: unused here
            import warnings

            warnings.warn(f"CLAP checkpoint {path!r}: {len(missing)} missing / {len(unexpected)} unexpected "
                          "non-audio keys (text branch, unused by the audio encoder)")

    def _embed_prepared(self, audio: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
        from laion_clap.training.data import get_audio_features

        x = audio[0].clamp(-1.0, 1.0)
        x = (x * 32767.0).to(torch.int16).float() / 32767.0  # laion-clap's int16 quantisation
        max_len = int(self.audio_cfg["clip_samples"])
        outs = []
        for i in range(0, len(bounds), self.batch_size):
            batch = []
            for s, e in bounds[i:i + self.batch_size]:
                seg = x[s:e]
                if seg.shape[0] > max_len:
                    seg = seg[:max_len]  # deterministic instead of laion-clap's random crop
                batch.append(get_audio_features({}, seg, max_len, data_truncating="rand_trunc",
                                                data_filling="repeatpad", audio_cfg=self.audio_cfg,
                                                require_grad=False))
            outs.append(self.model.get_audio_embedding(batch).float().cpu())
        return torch.cat(outs)


# ------------------------------------------------------------------------------------------
# OpenL3 (optional)
# ------------------------------------------------------------------------------------------

class OpenL3Encoder(AudioEncoder):
    """OpenL3 (music content, mel256, 512-d) through the ``openl3`` package (TensorFlow).

    Frame embeddings (``frame_hop_seconds`` apart) inside each segment are averaged."""

    name = "openl3"
    sample_rate = 48000
    dim = 512
    mono = True

    def __init__(self, segment_seconds: float = 10.0, hop_seconds: float = 1.0, content_type: str = "music",
                 input_repr: str = "mel256", embedding_size: int = 512, frame_hop_seconds: float = 0.5):
        super().__init__(segment_seconds, hop_seconds)
        try:
            import openl3  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "OpenL3Encoder needs the optional 'openl3' package (with TensorFlow), whose install downloads "
                "its weights, so it cannot be installed on an offline machine: `pip install openl3` on a machine "
                "with network access, or use build_audio_encoder('aisfx') / ('clap', checkpoint=...).") from e
        self._openl3 = openl3
        self.model = openl3.models.load_audio_embedding_model(input_repr=input_repr, content_type=content_type,
                                                               embedding_size=embedding_size)
        self.dim = int(embedding_size)
        self.frame_hop_seconds = float(frame_hop_seconds)

    def _embed_prepared(self, audio: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
        import numpy as np

        emb, ts = self._openl3.get_audio_embedding(audio[0].numpy(), self.sample_rate, model=self.model,
                                                   hop_size=self.frame_hop_seconds, center=False, verbose=False)
        emb, ts = torch.from_numpy(np.asarray(emb)).float(), torch.from_numpy(np.asarray(ts)).float()
        out = []
        for s, e in bounds:
            m = (ts >= s / self.sample_rate) & (ts + 1.0 <= max(e / self.sample_rate, ts[0].item() + 1.0))
            out.append(emb[m].mean(0) if m.any() else emb[:1].mean(0))
        return torch.stack(out)


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------

AUDIO_ENCODERS: dict[str, Callable[..., AudioEncoder]] = {
    "aisfx": AisfxEncoder,
    "clap": ClapAudioEncoder,
    "openl3": OpenL3Encoder,
}


def build_audio_encoder(name: str = DEFAULT_AUDIO_ENCODER, checkpoint: str | None = None, **kw) -> AudioEncoder:
    """Build an encoder by name: ``"aisfx"`` (default, offline), ``"clap"`` (needs ``checkpoint``),
    ``"openl3"`` (needs the openl3 package). Extra keywords go to the encoder's constructor."""
    key = name.lower()
    if key not in AUDIO_ENCODERS:
        raise KeyError(f"unknown audio encoder {name!r}; choose from {sorted(AUDIO_ENCODERS)}")
    if key == "clap":
        return ClapAudioEncoder(checkpoint, **kw)
    if checkpoint is not None:
        raise ValueError(f"encoder {name!r} takes no checkpoint (its weights ship with its package)")
    return AUDIO_ENCODERS[key](**kw)
