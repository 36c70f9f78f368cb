"""wandb, offline unless WANDB_MODE says otherwise (no network needed): Lightning's logger for the fitting
stages, and a plain run for the stages that log tables and figures."""
from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


class OfflineWandbLogger(WandbLogger):
    """Lightning's WandbLogger, offline by default; WANDB_MODE=online|offline|disabled is respected."""

    def __init__(self, project: str = "musicattr", save_dir: str | None = None, name: str | None = None,
                 offline: bool | None = None, log_model: bool = False, **kwargs):
        mode = os.environ.get("WANDB_MODE")
        save_dir = save_dir or wandb_dir()
        if offline is None:
            offline = mode != "online"
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, name=name, offline=offline, log_model=log_model, **kwargs)


def wandb_dir() -> str:
    """The folder of the wandb runs: the stage's run root (``MUSICATTR_WANDB_DIR``, set by the CLI), else runs."""
    return os.environ.get("MUSICATTR_WANDB_DIR") or "runs"


def open_wandb(name: str, config: dict[str, Any], enabled: bool = True, save_dir: str | None = None):
    """An offline wandb run (WANDB_MODE respected) under ``save_dir`` (default: ``wandb_dir()``), or None when
    disabled."""
    if not enabled or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    save_dir = save_dir or wandb_dir()
    os.makedirs(save_dir, exist_ok=True)
    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    return wandb.init(project="musicattr", name=name, config=config, dir=save_dir, mode=mode, reinit="finish_previous")
