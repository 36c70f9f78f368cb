"""The recipe every retrain of a campaign follows: theta0's own fit, with stated overrides.

The model (SAT config), optimiser and schedule (lr, weight decay, warm-up, lr schedule), CFG dropout,
padding mask and batch size are read from theta0's checkpoint (``hyper_parameters`` and
``datamodule_hyper_parameters``, written by ``musicattr fit``); the number of optimizer steps defaults
to theta0's (its ``global_step``). ``steps`` and ``overrides`` state a shorter or otherwise changed
recipe. Every subset is retrained with the same recipe, and so is the reference theta0' (the full store),
so a difference between two retrains comes from their data and seed only.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass

import torch

TRAINING_KEYS = ("batch_size", "gradient_clip_val")  # overrides that are not DiffusionModule arguments


@dataclass(frozen=True)
class Recipe:
    module: dict          # DiffusionModule init arguments (model_config, lr, warmup_steps, ...)
    steps: int            # optimizer steps of every retrain
    batch_size: int
    gradient_clip_val: float | None

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def describe(self) -> str:
        m = self.module
        return (f"{self.steps} steps, batch {self.batch_size}, lr {m.get('lr')} ({m.get('lr_schedule', 'constant')}, "
                f"warm-up {m.get('warmup_steps')}), gradient clip {self.gradient_clip_val}")


def recipe_from_checkpoint(checkpoint: str, steps: int | None = None, overrides: dict | None = None) -> Recipe:
    """theta0's recipe from its ``musicattr fit`` checkpoint; ``steps`` and ``overrides`` (DiffusionModule
    arguments such as lr or warmup_steps, plus batch_size and gradient_clip_val) replace its values."""
    from musicattr.models.diffusion_module import DiffusionModule

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "model_config" not in hp:
        raise ValueError(f"{checkpoint} has no hyper_parameters.model_config, so its recipe is unknown; fix: pass a "
                         "checkpoint written by `musicattr fit`")
    allowed = set(inspect.signature(DiffusionModule.__init__).parameters) - {"self"}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - allowed - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(f"recipe overrides {unknown} are not DiffusionModule arguments nor {list(TRAINING_KEYS)}; "
                         f"fix: use one of {sorted(allowed - {'model_config'}) + list(TRAINING_KEYS)}")
    module = {k: v for k, v in dict(hp).items() if k in allowed}
    module.update({k: v for k, v in overrides.items() if k in allowed})
    data = ckpt.get("datamodule_hyper_parameters") or {}
    batch_size = overrides.get("batch_size", data.get("batch_size"))
    if batch_size is None:
        raise ValueError(f"{checkpoint} records no batch size (no datamodule_hyper_parameters); fix: state it with "
                         "recipe: {batch_size: N}")
    steps = steps if steps is not None else int(ckpt.get("global_step") or 0)
    if steps <= 0:
        raise ValueError(f"{checkpoint} records no training steps; fix: state the retrain length with steps: N")
    return Recipe(module=module, steps=int(steps), batch_size=int(batch_size),
                  gradient_clip_val=overrides.get("gradient_clip_val", 1.0))
