"""The attribution task of the stable-audio-tools DiT trained by ``musicattr fit`` (the paper's model).

    z_t = alpha z + sigma eps,  target v = alpha eps - sigma z,  alpha = cos(pi t / 2), sigma = sin(pi t / 2)

(the v-objective, ``models/v_objective.py``); the network is SAT's DiTWrapper (``DiffusionModule.net``) called
without gradient checkpointing unless ``checkpointing`` asks for it; the conditioning is the stored text
embedding plus SAT's timing conditioners;
the frame mask comes from each item's valid length. Stateless: the model is an argument of every call.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from musicattr.attribution.task import AttributionTask
from musicattr.models.v_objective import v_objective

# parameter names relative to SAT's DiTWrapper, e.g. model.transformer.layers.3.cross_attn.to_kv.weight
SAT_GROUPS = {
    "all": r"transformer\.layers\.\d+\.",                      # every weight of every transformer block
    "self": r"transformer\.layers\.\d+\.self_attn\.",          # self-attention (to_qkv, to_out)
    "cross": r"transformer\.layers\.\d+\.cross_attn\.",        # cross-attention (to_q, to_kv, to_out)
    "to_kv": r"transformer\.layers\.\d+\.cross_attn\.to_kv\.",  # cross-attention keys/values only
}


class SATDiffusionTask(AttributionTask):
    """SAT ``diffusion_cond`` DiT with the v-objective (the model of ``musicattr fit``, a ``DiffusionModule``)."""

    parameter_groups = SAT_GROUPS

    def __init__(self, timesteps: str | None = None, checkpointing: bool = False, shared_draws: bool | None = None):
        """``checkpointing``: SAT's gradient checkpointing of the transformer blocks in passes that take gradients
        (not under torch.func): the same losses and gradients, one more forward, and activation memory of one
        block instead of all (at 1 B parameters and 2584 frames about 0.6 GB per block, 15 GB for 24)."""
        super().__init__(timesteps, shared_draws)
        self.checkpointing = bool(checkpointing)

    def load(self, checkpoint: str) -> torch.nn.Module:
        from musicattr.models.diffusion_module import load_diffusion_module

        return load_diffusion_module(checkpoint)

    def net(self, model) -> torch.nn.Module:
        return model.net

    def conditioning(self, model, batch: Mapping[str, Any]) -> dict[str, Any]:
        return model.conditioning_inputs(batch)

    def frame_mask(self, model, batch: Mapping[str, Any]) -> torch.Tensor:
        return model.frame_mask(batch)

    def noise(self, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v_objective(z, t, eps)

    def predict(self, model, z_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = {**cond, "use_checkpointing": self.checkpointing and params is None and torch.is_grad_enabled()}
        if params is None:
            return model.net(z_t, t, **kwargs)
        return torch.func.functional_call(model.net, dict(params), (z_t, t), kwargs)
