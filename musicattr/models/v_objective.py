"""The v-objective of the SAT DiT (Salimans & Ho, 2022, with SAT's cosine schedule):

    alpha = cos(pi t / 2),  sigma = sin(pi t / 2),  z_t = alpha z + sigma eps,  v = alpha eps - sigma z

used by its training step (``diffusion_module``) and by its attribution task (``sat_task``).
"""
from __future__ import annotations

import math

import torch


def v_objective(z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noised input z_t and v target for z [N, C, L], t [N], eps [N, C, L]."""
    shape = (-1,) + (1,) * (z.dim() - 1)
    alpha = torch.cos(t * math.pi / 2).view(shape)
    sigma = torch.sin(t * math.pi / 2).view(shape)
    return z * alpha + eps * sigma, eps * alpha - z * sigma
