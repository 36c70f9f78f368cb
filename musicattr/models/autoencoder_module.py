"""SAT's AudioAutoencoder (Oobleck encoder/decoder + VAE bottleneck) as a LightningModule.

Training loss on random audio crops x:  L = |x - D(E(x))|_1 + MRSTFT(x, D(E(x))) + beta * KL.
For real use, load an existing checkpoint (e.g. Stable Audio Open's VAE) with ``checkpoint``.
Encoding for the latent store uses the posterior mean (deterministic).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from musicattr.models.sat import build_autoencoder, init_kwargs, load_state_dict_checked, read_state_dict


class AutoencoderModule(L.LightningModule):
    def __init__(self, model_config: dict[str, Any], lr: float = 3e-4, kl_weight: float = 1e-4,
                 stft_weight: float = 1.0, checkpoint: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = model_config
        self.autoencoder = build_autoencoder(model_config)
        if checkpoint:
            load_pretrained_autoencoder(self.autoencoder, checkpoint)
        import auraloss

        self.stft = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=[2048, 512, 128], hop_sizes=[512, 128, 32],
                                                          win_lengths=[2048, 512, 128])

    @property
    def downsampling_ratio(self) -> int:
        return int(self.autoencoder.downsampling_ratio)

    @property
    def latent_dim(self) -> int:
        return int(self.autoencoder.latent_dim)

    @torch.no_grad()
    def encode_mean(self, audio: torch.Tensor) -> torch.Tensor:
        """Posterior mean latents [B, latent_dim, T / downsampling_ratio] of audio [B, C, T]."""
        pre = self.autoencoder.encode(audio, skip_bottleneck=True)
        return pre.chunk(2, dim=1)[0] if pre.shape[1] == 2 * self.latent_dim else pre

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
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

    def configure_optimizers(self):
        return torch.optim.AdamW(self.autoencoder.parameters(), lr=self.hparams.lr, betas=(0.8, 0.99))


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
