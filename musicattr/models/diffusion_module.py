"""The latent DiT as a ``lightning.LightningModule`` (pretraining = theta0).

Wraps SAT's ConditionedDiffusionModelWrapper. Training uses the v-objective
    t ~ U(0,1), z_t = cos(pi t/2) z + sin(pi t/2) eps, loss = || v_theta(z_t, t, c) - (cos eps - sin z) ||^2
over all latent frames (the paper's assumption: trained without the padding mask) or, with
``use_padding_mask``, over the non-padded frames only. Classifier-free guidance dropout zeroes
the text embedding with probability ``cfg_dropout_prob``.

Learning rate: linear warm-up over ``warmup_steps``, then constant (``lr_schedule: constant``) or a
cosine decay to ``min_lr_ratio * lr`` at the trainer's ``max_steps`` (``lr_schedule: cosine``), which
ends training near a minimum, as influence-style attribution assumes of theta0.
``use_checkpointing`` (SAT gradient checkpointing of the transformer blocks) saves memory on large
models; a small model trains about 1.4x faster without it.

Precision (configs/paper/fit.yaml: ``trainer.precision: bf16-mixed``, Lightning's ``MixedPrecision`` plugin): the
training and validation steps run under bfloat16 autocast, so the DiT's matrix multiplies are bf16; what stays
float32 is the weights, their gradients and AdamW's moments (the checkpoint, theta0, is float32), the v-objective's
inputs and target, and the loss: ``masked_mse`` casts the prediction to float32 before the squared error and its
mean. Nothing here depends on the precision; tests/test_bf16_path.py runs a few steps at bf16-mixed on the CPU
and compares them with 32-true.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from musicattr.attribution.loss import frame_mask_from_lengths, masked_mse
from musicattr.attribution.task import resolve_task
from musicattr.models.sat import TEXT_KEY, build_diffusion
from musicattr.models.v_objective import v_objective

VAL_TASK = "musicattr.models.sat_task.SATDiffusionTask"  # imported by path: sat_task imports this module


class DiffusionModule(L.LightningModule):
    def __init__(self, model_config: dict[str, Any], lr: float = 1e-4, weight_decay: float = 1e-3,
                 warmup_steps: int = 100, cfg_dropout_prob: float = 0.1, use_padding_mask: bool = False,
                 val_draws: int = 4, val_seed: int = 1234, lr_schedule: str = "constant",
                 min_lr_ratio: float = 0.0, use_checkpointing: bool = True):
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule {lr_schedule!r}: choose 'constant' or 'cosine'")
        self.save_hyperparameters()
        self.model_config = model_config
        self.diffusion = build_diffusion(model_config)

    @property
    def net(self):
        """The SAT DiTWrapper: net(x_t, t, **conditioning_inputs) -> v prediction."""
        return self.diffusion.model

    @property
    def sample_rate(self) -> int:
        return int(self.model_config["sample_rate"])

    def conditioning_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Text embedding [B, S, D] (pre-encoded) + SAT number conditioners for the timing."""
        text = batch["text_emb"].to(self.device)
        meta = [{"seconds_start": float(s), "seconds_total": float(t)}
                for s, t in zip(batch["seconds_start"], batch["seconds_total"])]
        tensors = self.diffusion.conditioner(meta, self.device)
        tensors[TEXT_KEY] = [text, torch.ones(text.shape[:2], device=self.device)]
        return self.diffusion.get_conditioning_inputs(tensors)

    def frame_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        return frame_mask_from_lengths(batch["valid_frames"].to(self.device), batch["latents"].shape[-1])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z = batch["latents"]
        cond = self.conditioning_inputs(batch)
        t = torch.rand(z.shape[0], device=z.device)
        x_t, target = v_objective(z, t, torch.randn_like(z))
        pred = self.net(x_t, t, **cond, cfg_dropout_prob=self.hparams.cfg_dropout_prob,
                        use_checkpointing=self.hparams.use_checkpointing)
        mask = self.frame_mask(batch) if self.hparams.use_padding_mask else None
        loss = masked_mse(pred, target, mask).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # the attribution loss itself (fixed draws per item), through the SAT task named by its class path
        loss = resolve_task(VAL_TASK).item_loss(self, batch, self.hparams.val_seed, self.hparams.val_draws,
                                                mask=self.hparams.use_padding_mask)
        self.log("val/loss", loss.float().mean(), prog_bar=True, sync_dist=True, batch_size=len(loss))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.diffusion.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay, betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``: warm-up, then constant or cosine decay."""
        warm = max(1, self.hparams.warmup_steps)
        if step < warm:
            return (step + 1) / warm
        if self.hparams.lr_schedule == "constant":
            return 1.0
        total = self.trainer.max_steps if self._trainer is not None else -1
        if total is None or total <= warm:
            raise ValueError("lr_schedule 'cosine' needs trainer.max_steps larger than warmup_steps")
        floor = self.hparams.min_lr_ratio
        progress = min(1.0, (step - warm) / (total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_diffusion_module(path: str, map_location: str = "cpu") -> DiffusionModule:
    """theta0: a DiffusionModule from a `musicattr fit` checkpoint (config from its hyper_parameters)."""
    from musicattr.models.sat import init_kwargs, load_state_dict_checked, mapped_checkpoint

    if not path or not __import__("os").path.exists(path):
        raise FileNotFoundError(f"DiT checkpoint not found: {path!r}; fix: run `musicattr fit` or give the path "
                                "of a checkpoint it wrote")
    ckpt = mapped_checkpoint(path, map_location)   # read once, memory-mapped: the weights are copied in, never held twice
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "model_config" not in hp:
        raise ValueError(f"{path} has no hyper_parameters.model_config; fix: pass a checkpoint written by "
                         "`musicattr fit`")
    module = DiffusionModule(**init_kwargs(DiffusionModule, hp))
    load_state_dict_checked(module, ckpt.get("state_dict", ckpt), path)
    del ckpt
    return module.eval()
