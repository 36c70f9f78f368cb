"""A second attribution task for the tests: a small convolutional denoiser (not a stable-audio-tools model)
with the epsilon-prediction objective under a variance-preserving linear schedule and discrete timesteps:

    z_t = sqrt(1 - t) z + sqrt(t) eps,   target eps,   loss || eps_theta(z_t, t, text) - eps ||^2

Configs choose it by class path: ``--model.task eps_task.EpsilonTask`` (``tests/`` is on the path of the
tests and of the ``musicattr`` processes they start, see conftest.cli). The Fisher, unlearning and
scoring run on it unchanged (tests/attribution/test_second_task.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from musicattr.attribution.loss import DiscreteTimesteps, frame_mask_from_lengths
from musicattr.attribution.task import AttributionTask


class TinyDenoiser(nn.Module):
    """eps_theta(z_t, t, text): three 1-d convolutions, time and mean text embedding added after the first."""

    def __init__(self, channels: int = 4, text_dim: int = 32, width: int = 16):
        super().__init__()
        self.inp = nn.Conv1d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.text = nn.Linear(text_dim, width)
        self.mid = nn.Conv1d(width, width, 3, padding=1)
        self.out = nn.Conv1d(width, channels, 3, padding=1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.inp(z_t) + self.time(t[:, None])[:, :, None] + self.text(text.mean(1))[:, :, None]
        return self.out(torch.tanh(self.mid(torch.tanh(h))))


def eps_noise(z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (-1,) + (1,) * (z.dim() - 1)  # any latent shape: [N, C, L] or [N, C, H, L]
    return (1 - t).sqrt().view(shape) * z + t.sqrt().view(shape) * eps, eps


class EpsilonTask(AttributionTask):
    """The TinyDenoiser with epsilon prediction; layer groups ``all`` (the three convolutions) and ``mid``.
    Its timesteps are discrete (``DiscreteTimesteps(1000)``, as DDPM-style models train), not U(0, 1)."""

    parameter_groups = {"all": r"^(inp|mid|out)\.", "mid": r"^mid\."}
    timesteps = DiscreteTimesteps(1000)

    def load(self, checkpoint: str) -> nn.Module:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = TinyDenoiser(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()

    def net(self, model: nn.Module) -> nn.Module:
        return model

    def conditioning(self, model, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"text": batch["text_emb"].to(next(model.parameters()).device)}

    def frame_mask(self, model, batch: Mapping[str, Any]) -> torch.Tensor:
        device = next(model.parameters()).device
        return frame_mask_from_lengths(batch["valid_frames"].to(device), batch["latents"].shape[-1])

    def noise(self, z, t, eps):
        return eps_noise(z, t, eps)

    def predict(self, model, z_t, t, cond, params=None):
        if params is None:
            return model(z_t, t, **cond)
        return torch.func.functional_call(model, dict(params), (z_t, t), dict(cond))


def save_eps_checkpoint(path, seed: int = 0, **config) -> str:
    torch.manual_seed(seed)
    model = TinyDenoiser(**config)
    torch.save({"config": config, "state_dict": model.state_dict()}, path)
    return str(path)
