"""WandbLogger that is offline unless WANDB_MODE says otherwise (no network needed)."""
from __future__ import annotations

import os

from lightning.pytorch.loggers import WandbLogger


class OfflineWandbLogger(WandbLogger):
    """Lightning's WandbLogger, offline by default; WANDB_MODE=online|offline|disabled is respected."""

    def __init__(self, project: str = "musicattr", save_dir: str = "runs", name: str | None = None,
                 offline: bool | None = None, log_model: bool = False, **kwargs):
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode != "online"
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, name=name, offline=offline, log_model=log_model, **kwargs)
