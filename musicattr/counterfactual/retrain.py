"""One retrain: the DiT fitted with the campaign's recipe on the latent store minus a set of item ids.

Each retrain has its own run folder (``retrains/<seed>-<count>-<hash>/``, keyed by the removed set, the
seed, the recipe and the store) holding

    run.json      the key (a folder holding another key is refused, never reused)
    removed.txt   the removed item ids, one a line (``LatentDataModule(exclude=...)`` reads it)
    last.ckpt     Lightning's resume state, every ``checkpoint_every`` steps (deleted once the model is saved)
    model.ckpt    the trained weights, written last: the retrain is finished once it exists

so an interrupted retrain resumes from ``last.ckpt``. The fit is a Lightning ``Trainer.fit`` of the same
``DiffusionModule`` and ``LatentDataModule`` as ``musicattr fit``, with the recipe's steps and clipping;
``trainer`` options choose the hardware (under ``strategy: ddp`` every rank runs the same command).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

from musicattr.atomic import atomic_path, atomic_write_json, atomic_write_text
from musicattr.counterfactual.recipe import Recipe
from musicattr.parts import RunMismatchError

log = logging.getLogger(__name__)
MODEL = "model.ckpt"
RESUME = "last.ckpt"


def finished(run_dir: Path) -> bool:
    return (Path(run_dir) / MODEL).exists()


def claim(run_dir: Path, key: dict, removed: tuple[str, ...]) -> None:
    """Record the run's key and removed ids; a folder that holds another run is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = json.loads(json.dumps(key))
    key_file = run_dir / "run.json"
    if key_file.exists() and json.loads(key_file.read_text()) != key:
        raise RunMismatchError(f"{run_dir} holds a retrain with another key (removed set, seed, recipe or store); "
                               "fix: move that folder away, or give the campaign another out_dir")
    if not key_file.exists():
        atomic_write_text(run_dir / "removed.txt", "".join(f"{i}\n" for i in removed))
        atomic_write_json(key_file, key)


class StepProgress(L.Callback):
    """Advances a campaign-wide progress bar (tqdm) by the optimizer steps of this retrain."""

    def __init__(self, bar):
        self.bar = bar
        self._seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen = trainer.global_step
        self.bar.update(trainer.global_step)  # steps restored from last.ckpt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bar.update(trainer.global_step - self._seen)
        self._seen = trainer.global_step


def retrain_trainer(run_dir: Path, recipe: Recipe, trainer: dict | None, callbacks=(), checkpoint_every: int = 100,
                    progress_bar: bool = False) -> L.Trainer:
    """The Trainer of a retrain: the stage's hardware options (accelerator, devices, strategy, precision, ...) with
    the recipe's steps and clipping, resume checkpoints in ``run_dir``, no validation and no logger."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    options = dict(trainer or {})
    resume = ModelCheckpoint(dirpath=str(run_dir), filename="resume", save_last=True, save_top_k=0,
                             every_n_train_steps=max(1, checkpoint_every))
    options.update(max_steps=recipe.steps, max_epochs=-1, gradient_clip_val=recipe.gradient_clip_val,
                   default_root_dir=str(run_dir), logger=False, enable_checkpointing=True,
                   callbacks=[*(options.get("callbacks") or []), resume, *callbacks], limit_val_batches=0,
                   num_sanity_val_steps=0, enable_progress_bar=progress_bar, enable_model_summary=False)
    return L.Trainer(**options)


def fit_retrain(run_dir: str | Path, recipe: Recipe, store: str, removed: tuple[str, ...], seed: int, key: dict,
                trainer: dict | None = None, callbacks=(), checkpoint_every: int = 100,
                progress_bar: bool = False) -> Path:
    """Train the recipe on the store minus ``removed`` with ``seed`` (resuming from ``last.ckpt``); return the
    path of ``model.ckpt`` (None on the other ranks of a DDP run). A finished retrain returns at once."""
    from musicattr.data.datamodules import LatentDataModule
    from musicattr.models.diffusion_module import DiffusionModule

    run_dir = Path(run_dir)
    claim(run_dir, key, removed)
    if finished(run_dir):
        return run_dir / MODEL
    L.seed_everything(seed, workers=True, verbose=False)
    module = DiffusionModule(**recipe.module)
    data = LatentDataModule(store, batch_size=recipe.batch_size, num_workers=0, exclude=str(run_dir / "removed.txt"))
    t = retrain_trainer(run_dir, recipe, trainer, callbacks, checkpoint_every, progress_bar)
    resume = run_dir / RESUME
    t.fit(module, datamodule=data, ckpt_path=str(resume) if resume.exists() else None)
    if t.global_step < recipe.steps:
        raise RuntimeError(f"retrain {run_dir} stopped at step {t.global_step} of {recipe.steps}; fix: rerun the "
                           "campaign, it resumes from last.ckpt")
    if t.is_global_zero:
        with atomic_path(run_dir / MODEL) as tmp:
            torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                        "global_step": t.global_step, "retrain": json.loads(json.dumps(key))}, tmp)
        resume.unlink(missing_ok=True)
        log.debug("retrain %s: %d steps on %d items", run_dir.name, t.global_step, len(data.train_set))
    return run_dir / MODEL if t.is_global_zero else None
