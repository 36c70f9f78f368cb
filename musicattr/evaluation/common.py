"""Shared steps of the evaluations: training-set audio embeddings, in-process scoring, wandb runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from musicattr.data.audio_folder import read_metadata
from musicattr.data.latent_store import LatentStore


def store_folder(store: LatentStore) -> Path:
    return Path(store.manifest["folder"])


def planted_groups(store: LatentStore) -> dict[str, str]:
    """file_name -> planted group (the original's file_name) for tracks planted by the corpus builder."""
    return {f: r["planted_group"] for f, r in read_metadata_rows(store).items() if r.get("planted_group")}


def read_metadata_rows(store: LatentStore) -> dict[str, dict]:
    """file_name -> metadata row of the store's audio folder (``read_metadata``: metadata.jsonl or .csv), {}
    when the folder has neither."""
    folder = store_folder(store)
    if not any((folder / n).is_file() for n in ("metadata.jsonl", "metadata.csv")):
        return {}
    return {r["file_name"]: r for r in read_metadata(folder)}


def diverse_items(store: LatentStore, track_embeddings: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    """Positions of k diverse training items (k-means over their track embeddings, the item nearest each
    centroid), never a planted duplicate: the train-to-train targets of Section 3.1."""
    from musicattr.evaluation.target_selection import select_targets

    planted = planted_groups(store)
    eligible = [i for i, f in enumerate(store.items["file_name"]) if f not in planted]
    chosen = select_targets(track_embeddings[eligible], min(k, len(eligible)), seed=seed)
    return [eligible[c] for c in chosen]


PREDICT_TRAINER = {"logger": False, "use_distributed_sampler": False, "enable_progress_bar": False,
                   "enable_model_summary": False}


def predict_trainer(trainer: dict | None = None, **forced):
    """A Lightning Trainer for a prediction pass of a function stage: the stage's ``trainer`` options over the
    prediction defaults (no logger, no distributed sampler: the data module shards the items itself), then
    ``forced``. Several processes: ``strategy: ddp_spawn`` (each pass spawns its ranks; the rest of the stage
    runs once); ``ddp`` is refused, as it would rerun the whole command in every process."""
    import lightning as L

    options = {**PREDICT_TRAINER, **(trainer or {}), "use_distributed_sampler": False, **forced}
    if options.get("strategy") == "ddp":
        raise ValueError("--trainer.strategy ddp relaunches the whole command in every process, which would repeat "
                         "this stage's unlearning and generation; fix: use --trainer.strategy ddp_spawn for evaluate "
                         "and compare (or run `musicattr attribute` with ddp)")
    return L.Trainer(**options)


def score_store(checkpoint: str, store: str, unlearned: str, out_dir: str, num_draws: int, seed: int,
                batch_size: int = 16, trainer: dict | None = None, mask_loss: bool | None = None,
                relative: bool = False, task=None) -> pd.DataFrame:
    """Eq. 1 for every training item with the Lightning prediction loop (ScoringModule over the store's
    StorePredictDataModule); with ``relative`` also tau_i / s_i and its rank (RelatIF). ``trainer``: the
    Trainer options of the calling stage (accelerator, devices, strategy, ...)."""
    from musicattr.attribution.score import ScoringModule
    from musicattr.data.datamodules import StorePredictDataModule

    module = ScoringModule(checkpoint, unlearned, out_dir, task=task, num_draws=num_draws, seed=seed,
                           mask_loss=mask_loss, overwrite=True, top_k=0, relative=relative)
    predict_trainer(trainer, inference_mode=False if relative else (trainer or {}).get("inference_mode", True)
                    ).predict(module, datamodule=StorePredictDataModule(store, batch_size))
    return pd.read_parquet(Path(out_dir) / "scores.parquet")


def unlearn_device(trainer: dict | None) -> str:
    """The device ``run_unlearn`` uses in a function stage: the GPU when the trainer's accelerator is one."""
    accelerator = str((trainer or {}).get("accelerator", "cpu"))
    return "cuda" if accelerator in ("gpu", "cuda") else "cpu"


def generate_audio(module, ae, text_emb: torch.Tensor, seconds: list[float], max_frames: int,
                   steps: int, seed: int) -> list[torch.Tensor]:
    """Decoded generations [C, T] of ``module`` for (caption embedding, duration) pairs."""
    import math

    from musicattr.models.generate import sample_latents

    out = []
    for i, (emb, sec) in enumerate(zip(text_emb, seconds)):
        z = sample_latents(module, emb[None], math.ceil(sec), max_frames, steps, 5.0, seed + i)
        out.append(ae.decode(z)[0, :, : int(sec * module.sample_rate)].cpu())
    return out
