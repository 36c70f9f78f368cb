"""SAT's AudioAutoencoder (Oobleck encoder/decoder + VAE bottleneck) as a LightningModule.

Two front ends, chosen by the model config:

* waveform (the paper, Stable Audio): the Oobleck VAE codes audio x directly; training loss on
  random crops  L = |x - D(E(x))|_1 + MRSTFT(x, D(E(x))) + beta * KL.
* log-mel (the demo, ``spectrogram:`` in the config): the Oobleck VAE codes the normalised log-mel
  m = LogMel(x) over its n_mels channels;  L = |m - D(E(m))|_1 + beta * KL, and decoding inverts
  the mel by Griffin-Lim (see models/spectrogram.py). The latent frame rate is
  sample_rate / (hop_length * SAT downsampling_ratio).

For real use, load an existing checkpoint (e.g. Stable Audio Open's VAE) with ``checkpoint``.
Encoding for the latent store uses the posterior mean (deterministic).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from musicattr.atomic import atomic_write_text
from musicattr.models.health import HEALTH_FILE, check_reconstruction, reconstruction_health
from musicattr.models.spectrogram import LogMel
from musicattr.models.sat import build_autoencoder, init_kwargs, load_state_dict_checked, read_state_dict


log = logging.getLogger(__name__)


class AutoencoderModule(L.LightningModule):
    def __init__(self, model_config: dict[str, Any], lr: float = 3e-4, kl_weight: float = 1e-4,
                 stft_weight: float = 1.0, checkpoint: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = model_config
        self.autoencoder = build_autoencoder(model_config)
        spec = model_config.get("spectrogram")
        self.frontend = LogMel(int(model_config["sample_rate"]), **spec) if spec else None
        if checkpoint:
            load_pretrained_autoencoder(self.autoencoder, checkpoint)
        import auraloss

        self.stft = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=[2048, 512, 128], hop_sizes=[512, 128, 32],
                                                          win_lengths=[2048, 512, 128])

    @property
    def downsampling_ratio(self) -> int:
        """Audio samples per latent frame."""
        hop = self.frontend.hop_length if self.frontend is not None else 1
        return int(self.autoencoder.downsampling_ratio) * hop

    @property
    def latent_dim(self) -> int:
        return int(self.autoencoder.latent_dim)

    @torch.no_grad()
    def encode_mean(self, audio: torch.Tensor) -> torch.Tensor:
        """Posterior mean latents [B, latent_dim, T / downsampling_ratio] of audio [B, C, T]."""
        x = self.frontend(audio) if self.frontend is not None else audio
        pre = self.autoencoder.encode(x, skip_bottleneck=True)
        return pre.chunk(2, dim=1)[0] if pre.shape[1] == 2 * self.latent_dim else pre

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Audio [B, C, frames * downsampling_ratio] of latents [B, latent_dim, frames]."""
        y = self.autoencoder.decode(latents)
        return self.frontend.inverse(y) if self.frontend is not None else y

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.frontend is not None:
            return self._spectrogram_step(batch)
        x = batch["audio"]
        z, info = self.autoencoder.encode(x, return_info=True)
        y = self.autoencoder.decode(z)[..., : x.shape[-1]]
        l1 = (y - x).abs().mean()
        stft = self.stft(y, x)
        kl = info.get("kl", torch.zeros((), device=x.device))
        loss = l1 + self.hparams.stft_weight * stft + self.hparams.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/l1": l1, "train/stft": stft, "train/kl": kl},
                      prog_bar=True, batch_size=x.shape[0])
        return loss

    def _spectrogram_step(self, batch: dict[str, Any]) -> torch.Tensor:
        m = self.frontend(batch["audio"])
        z, info = self.autoencoder.encode(m, return_info=True)
        l1 = (self.autoencoder.decode(z)[..., : m.shape[-1]] - m).abs().mean()
        kl = info.get("kl", torch.zeros((), device=m.device))
        loss = l1 + self.hparams.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/l1": l1, "train/kl": kl}, prog_bar=True, batch_size=m.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.autoencoder.parameters(), lr=self.hparams.lr, betas=(0.8, 0.99))

    def on_train_end(self) -> None:
        """Representation health on the datamodule's held-back tracks: written to ``health.json`` beside
        the checkpoints (``encode`` copies it into the store's manifest) and logged to wandb."""
        dm = getattr(self.trainer, "datamodule", None)
        if not self.trainer.is_global_zero or dm is None or not hasattr(dm, "held_back_tracks"):
            return
        tracks = dm.held_back_tracks()
        if len(tracks) < 2:
            log.warning("fewer than 2 held-back tracks: no reconstruction health check (set data.held_back)")
            return
        was_training = self.training
        self.eval()
        report = {**reconstruction_health(self, tracks, self.sample_rate),
                  "held_back": [r["file_name"] for r in dm.held_back_rows], "step": int(self.global_step)}
        self.train(was_training)
        out = Path(self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback
                   else self.trainer.default_root_dir) / HEALTH_FILE
        atomic_write_text(out, json.dumps(report, indent=2))
        log.info("autoencoder health on %d held-back tracks: chroma cosine %.3f (another track: %.3f), "
                 "MR-STFT %.3f -> %s", report["tracks"], report["chroma_own"], report["chroma_other"],
                 report["mrstft"], out)
        check_reconstruction(report, str(out.parent))
        for lg in self.trainer.loggers:
            lg.log_metrics({f"health/{k}": v for k, v in report.items() if isinstance(v, float)},
                           step=int(self.global_step))

    @property
    def sample_rate(self) -> int:
        return int(self.model_config["sample_rate"])


def load_pretrained_autoencoder(autoencoder: torch.nn.Module, path: str) -> None:
    """Load weights from a Lightning checkpoint of this module, a SAT training checkpoint
    (keys under ``autoencoder.``) or a bare state dict / safetensors file."""
    state = read_state_dict(path)
    for prefix in ("autoencoder.", "model.autoencoder.", "pretransform.model.", ""):
        if any(k.startswith(prefix) for k in state) or prefix == "":
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                return load_state_dict_checked(autoencoder, sub, path)
    load_state_dict_checked(autoencoder, state, path)


def load_autoencoder_module(path: str, map_location: str = "cpu") -> AutoencoderModule:
    """Load a trained AutoencoderModule from its Lightning checkpoint (config from hyper_parameters)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if "model_config" not in hp:
        raise ValueError(f"{path} has no hyper_parameters.model_config; fix: pass a checkpoint written by "
                         "`musicattr autoencoder`, or give model_config and use it as `checkpoint`.")
    hp["checkpoint"] = None
    module = AutoencoderModule(**init_kwargs(AutoencoderModule, hp))
    load_state_dict_checked(module, ckpt["state_dict"], path)
    return module.eval()


def store_autoencoder(manifest: dict) -> AutoencoderModule:
    """The autoencoder a latent store was encoded with (its manifest names the weights and the config)."""
    return load_autoencoder(manifest["autoencoder"], manifest.get("autoencoder_config"))


def load_autoencoder(path: str, config: str | None = None) -> AutoencoderModule:
    """An autoencoder from a `musicattr autoencoder` checkpoint, or from any SAT-compatible weights
    file plus its SAT model config (a JSON file, e.g. Stable Audio Open's VAE)."""
    import json
    import os

    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"autoencoder checkpoint not found: {path!r}; fix: run `musicattr autoencoder` "
                                "or give the path of pretrained VAE weights (with autoencoder_config)")
    if config is None:
        return load_autoencoder_module(path)
    with open(config) as f:
        cfg = json.load(f)
    return AutoencoderModule(cfg, checkpoint=path).eval()
