"""Distributed scoring of every training latent (paper Eq. 1).

    tau_i = L(z_i, theta_unlearned; M_L) - L(z_i, theta0; M_L)

``ScoringModule`` runs in ``Trainer.predict`` over the latent store (DDP over GPUs, or gloo
processes on the CPU); each rank takes a disjoint slice of the items (no padding duplicates).
theta0 and theta_unlearned differ only in the tensors of the unlearned file: both versions are
kept and swapped in by assignment (no add/subtract round-off). The baseline losses
L(z_i, theta0) do not depend on the query, so they are cached in ``<store>/baselines/``, keyed by
everything they depend on (``baseline_key``; see ``musicattr.attribution.cache``), and reused by every
later query. ``ScoreWriter`` (a Lightning prediction
writer) writes parts as they come; a killed run resumes from them, and rank 0 merges them into
``scores.parquet``: item_id, caption, file_name, score, rank, baseline_loss, unlearned_loss, ...

With ``relative``, the table also holds the relative score tau_i / s_i and its rank (see
``musicattr.attribution.sensitivity``); s_i is cached in ``<store>/sensitivity/`` like the baselines.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Subset

from musicattr.attribution.loss import item_loss
from musicattr.attribution.masks import resolve_masks
from musicattr.attribution.cache import cache_path, read_cache, write_cache
from musicattr.attribution.sensitivity import item_sensitivity
from musicattr.attribution.unlearn import damped_inverse, load_unlearned
from musicattr.data.datamodules import item_slice, predict_loader
from musicattr.data.latent_store import LatentStore
from musicattr.models.diffusion_module import load_diffusion_module
from musicattr.models.sat import file_fingerprint
from musicattr.run_dir import claim_run_dir


class RunMismatchError(RuntimeError):
    pass


def read_parts(parts: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(parts.glob("part-*.parquet"))]
    cols = ["index", "baseline_loss", "unlearned_loss", "sensitivity"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


class ScoringModule(L.LightningModule):
    """Scores the latent store against one unlearned model (use with ``ScoreWriter``)."""

    def __init__(self, checkpoint: str, store: str, unlearned: str, out_dir: str, num_draws: int = 16,
                 seed: int = 0, mask_loss: bool | None = None, batch_size: int = 16, num_workers: int = 0,
                 draws_per_forward: int = 16, use_baseline_cache: bool = True, flush_every: int = 10,
                 top_k: int = 10, overwrite: bool = False, relative: bool = False, fisher: str | None = None):
        """Args (beyond the obvious): ``relative`` adds tau_i / s_i (RelatIF) and its rank; it needs the
        Fisher of the unlearning run (``fisher``, default: the path recorded in the unlearned file)."""
        super().__init__()
        self.save_hyperparameters()
        self.theta0 = load_diffusion_module(checkpoint)
        self.changed, self.unlearn_meta = load_unlearned(unlearned)
        strategy = self.unlearn_meta.get("strategy")
        self.mask_loss = resolve_masks(strategy, mask_loss=mask_loss)[1]
        self.checkpoint_fp = file_fingerprint(checkpoint)
        if "checkpoint_fingerprint" not in self.unlearn_meta:
            raise RunMismatchError(f"{unlearned} records no checkpoint fingerprint, so nothing ties it to "
                                   f"{checkpoint}; fix: rerun `musicattr unlearn` to rewrite it")
        if self.unlearn_meta["checkpoint_fingerprint"] != self.checkpoint_fp:
            raise RunMismatchError(f"{unlearned} was unlearned from another checkpoint than {checkpoint}; "
                                   "fix: pass the checkpoint it was made from")
        self.out_dir = Path(out_dir)
        self.store = LatentStore(store)
        self.cached_baseline: dict[int, float] = {}
        self.cached_sensitivity: dict[int, float] = {}
        self.float_error: float | None = None
        if relative:
            self._init_relative(fisher or self.unlearn_meta.get("fisher"))

    def _init_relative(self, fisher: str | None) -> None:
        from musicattr.attribution.fisher import load_fisher

        if not fisher:
            raise ValueError(f"relative scores need the Fisher of the unlearning run, and {self.hparams.unlearned} "
                             "records none; fix: pass --model.fisher PATH")
        fisher_fp = file_fingerprint(fisher)
        if "fisher_fingerprint" not in self.unlearn_meta:
            raise RunMismatchError(f"{self.hparams.unlearned} records no Fisher fingerprint, so the relative score "
                                   "cannot check it uses the unlearning run's Fisher; fix: rerun `musicattr unlearn`")
        if self.unlearn_meta["fisher_fingerprint"] != fisher_fp:
            raise RunMismatchError(f"{fisher} is not the Fisher {self.hparams.unlearned} was unlearned with; "
                                   "fix: pass that Fisher with --model.fisher")
        tensors, _ = load_fisher(fisher, self.checkpoint_fp)
        damping = float(self.unlearn_meta.get("damping", 1e-3))
        self.inverse = {k: v.float() for k, v in damped_inverse(tensors, self.changed, damping).items()}
        self.fisher_fp, self.damping = fisher_fp, damping

    def baseline_key(self) -> dict[str, Any]:
        """What L(z_i, theta0) depends on, beyond reduction order: the key of the baseline cache."""
        dtype = next(iter(self.theta0.net.parameters())).dtype
        return {"checkpoint_fingerprint": self.checkpoint_fp, "store_fingerprint": self.store.fingerprint,
                "num_draws": self.hparams.num_draws, "seed": self.hparams.seed, "mask_loss": self.mask_loss,
                "dtype": str(dtype), "device": self.device.type}

    def sensitivity_key(self) -> dict[str, Any]:
        """What s_i depends on: the baseline key, the Fisher, the unlearned tensors and the damping."""
        return {**self.baseline_key(), "fisher_fingerprint": self.fisher_fp, "tensors": sorted(self.changed),
                "damping": self.damping}

    def configure_callbacks(self):
        return [ScoreWriter(self.hparams.flush_every)]

    def run_key(self) -> dict[str, Any]:
        return {"checkpoint_fingerprint": self.checkpoint_fp, "unlearned": self.unlearn_meta,
                "unlearned_fingerprint": file_fingerprint(self.hparams.unlearned),
                "num_draws": self.hparams.num_draws, "seed": self.hparams.seed, "mask_loss": self.mask_loss,
                "store": str(self.store.root.resolve()), "relative": self.hparams.relative}

    def setup(self, stage: str) -> None:
        self.theta0.to(self.device)
        named = dict(self.theta0.net.named_parameters())
        unknown = [k for k in self.changed if k not in named]
        if unknown:
            raise RunMismatchError(f"{self.hparams.unlearned} names tensors absent from the model: {unknown[:3]}")
        self.params = {k: named[k] for k in self.changed}
        self.original = {k: p.detach().clone() for k, p in self.params.items()}
        self.unlearned_values = {k: v.to(self.device, self.params[k].dtype) for k, v in self.changed.items()}
        if self.hparams.relative:
            self.inverse = {k: v.to(self.device) for k, v in self.inverse.items()}
        parts = self.out_dir / "parts"
        if self.trainer.is_global_zero:
            claim_run_dir(parts, self.out_dir / "run.json", self.run_key(), self.hparams.overwrite, "part-*.parquet",
                          RunMismatchError(f"{self.out_dir} holds scores of another run (other unlearned weights, "
                                           "draws, seed or mask); fix: choose another out_dir, or pass "
                                           "--model.overwrite true to replace them"))
        self.trainer.strategy.barrier()
        self.done = set(read_parts(parts)["index"].astype(int))
        self.cache_path = cache_path(self.store.root, "baselines", self.baseline_key())
        if self.hparams.use_baseline_cache:
            self.cached_baseline = read_cache(self.cache_path, "baseline_loss")
        if self.hparams.relative:
            self.sensitivity_path = cache_path(self.store.root, "sensitivity", self.sensitivity_key())
            if self.hparams.use_baseline_cache:
                self.cached_sensitivity = read_cache(self.sensitivity_path, "sensitivity")

    def predict_dataloader(self):
        todo = [pos for pos, idx in enumerate(self.store.items["index"]) if int(idx) not in self.done]
        if not todo and self.trainer.is_global_zero:  # every item scored earlier: the loop will not run
            print_top(merge_scores(self), self.hparams.top_k)
        return predict_loader(Subset(self.store, todo), self.hparams.batch_size, self.hparams.num_workers,
                              self.trainer)

    def _float_error_probe(self, batch, baseline: torch.Tensor, n: int = 4) -> float:
        """Float error of a loss: L(z_i, theta0) recomputed item by item (other reductions than in the
        batch) against the batched / cached value. Scores far below it are not measurable."""
        self._set(self.original)
        diffs = []
        for j in range(min(n, len(batch["index"]))):
            diffs.append(abs(float(self._loss(item_slice(batch, j))[0]) - float(baseline[j])))
        return max(max(diffs), float(torch.finfo(torch.float32).eps) * float(baseline.abs().max()))

    def _set(self, values: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.data = values[k]

    def _loss(self, batch) -> torch.Tensor:
        m = self.theta0
        mask = m.frame_mask(batch) if self.mask_loss else None
        return item_loss(m.net, batch["latents"], m.conditioning_inputs(batch), batch["item_id"],
                         self.hparams.seed, self.hparams.num_draws, mask, self.hparams.draws_per_forward)

    def _sensitivity(self, batch, idx: list[int]) -> np.ndarray:
        """s_i at theta0 (cached, or one backward pass per item)."""
        if all(i in self.cached_sensitivity for i in idx):
            return np.array([self.cached_sensitivity[i] for i in idx], dtype=np.float64)
        self._set(self.original)
        m = self.theta0
        return item_sensitivity(m.net, self.params, self.inverse, batch, m.conditioning_inputs,
                                m.frame_mask if self.mask_loss else None, self.hparams.seed,
                                self.hparams.num_draws, self.hparams.draws_per_forward).numpy()

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any]:
        idx = [int(i) for i in batch["index"]]
        with torch.no_grad():
            self._set(self.unlearned_values)
            unlearned = self._loss(batch)
            if all(i in self.cached_baseline for i in idx):
                baseline = torch.tensor([self.cached_baseline[i] for i in idx], dtype=torch.float64)
            else:
                self._set(self.original)
                baseline = self._loss(batch)
            if batch_idx == 0 and self.float_error is None:
                self.float_error = self._float_error_probe(batch, baseline)
        out = {"index": idx, "baseline_loss": baseline.cpu().numpy(), "unlearned_loss": unlearned.cpu().numpy()}
        if self.hparams.relative:
            out["sensitivity"] = self._sensitivity(batch, idx)
        return out


class ScoreWriter(BasePredictionWriter):
    """Writes each rank's scores as they come; rank 0 merges them at the end of the pass."""

    def __init__(self, flush_every: int = 10):
        super().__init__(write_interval="batch")
        self.flush_every = flush_every
        self._rows: list[pd.DataFrame] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self._rows.append(pd.DataFrame(prediction))
        if len(self._rows) >= self.flush_every:
            self._flush(pl_module, trainer.global_rank)

    def _flush(self, pl_module, rank: int) -> None:
        if not self._rows:
            return
        df = pd.concat(self._rows, ignore_index=True)
        parts = pl_module.out_dir / "parts"
        name = parts / f"part-r{rank}-{uuid.uuid4().hex[:12]}.parquet"
        df.to_parquet(name.with_suffix(".tmp"), index=False)
        os.replace(name.with_suffix(".tmp"), name)
        self._rows = []

    def on_predict_end(self, trainer, pl_module) -> None:
        self._flush(pl_module, trainer.global_rank)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            print_top(merge_scores(pl_module), pl_module.hparams.top_k)
        trainer.strategy.barrier()


def merge_scores(m: ScoringModule) -> pd.DataFrame:
    """One row per training item (duplicates dropped), ranked by tau (1 = most influenced)."""
    parts = read_parts(m.out_dir / "parts").drop_duplicates("index", keep="first")
    parts["index"] = parts["index"].astype(int)
    items = m.store.items
    missing = set(items["index"].astype(int)) - set(parts["index"])
    if missing:
        raise RuntimeError(f"{len(missing)} items have no score in {m.out_dir}/parts; fix: rerun to resume")
    relative = m.hparams.relative
    if relative and ("sensitivity" not in parts or parts["sensitivity"].isna().any()):
        raise RuntimeError(f"{m.out_dir}/parts holds scores without sensitivities (written by a run without "
                           "relative); fix: rerun with --model.overwrite true")
    extra = ["sensitivity"] if relative else []
    df = items[["index", "item_id", "caption", "file_name", "duration_s", "valid_frames"]].merge(
        parts[["index", "baseline_loss", "unlearned_loss", *extra]], on="index")
    df["score"] = df["unlearned_loss"].astype(np.float64) - df["baseline_loss"]
    if relative:
        df["relative_score"] = df["score"] / df["sensitivity"].astype(np.float64)
        order = df.sort_values(["relative_score", "index"], ascending=[False, True]).index
        df.loc[order, "relative_rank"] = np.arange(1, len(df) + 1)
        df["relative_rank"] = df["relative_rank"].astype(np.int64)
    df = df.sort_values(["score", "index"], ascending=[False, True]).reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    df["method"] = "unlearning"
    df["query_id"] = m.unlearn_meta.get("query_id")
    tmp = m.out_dir / "scores.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, m.out_dir / "scores.parquet")
    if m.hparams.use_baseline_cache:
        if not m.cached_baseline:
            write_cache(df[["index", "baseline_loss"]], m.cache_path, m.baseline_key())
        if relative and not m.cached_sensitivity:
            write_cache(df[["index", "sensitivity"]], m.sensitivity_path, m.sensitivity_key())
    write_noise_report(df, m.float_error, m.out_dir / "noise.json")
    return df


def write_noise_report(df: pd.DataFrame, float_error: float | None, path: Path) -> dict:
    """How large the scores are against the float error of the two losses (the noise floor)."""
    tau = df["score"].abs()
    report = {"float_error": float_error, "median_abs_score": float(tau.median()), "max_abs_score": float(tau.max()),
              "baseline_loss_mean": float(df["baseline_loss"].mean())}
    if float_error:
        report["median_score_over_float_error"] = report["median_abs_score"] / float_error
        report["top_score_over_float_error"] = report["max_abs_score"] / float_error
        if report["max_abs_score"] < 100 * float_error:
            print(f"warning: the largest |tau| ({report['max_abs_score']:.2e}) is within 100x of the float error of "
                  f"the losses ({float_error:.2e}); fix: raise the unlearning lr or steps", flush=True)
    path.write_text(json.dumps(report, indent=2))
    return report


def print_top(df: pd.DataFrame, k: int) -> None:
    """Print the k best-scored training items (nothing for k = 0)."""
    if k <= 0:
        return
    if df.empty:
        print("no training items were scored")
        return
    print(f"\nTop-{k} training tracks by attribution score tau (query {df['query_id'].iloc[0]!r}):")
    relative = "relative_rank" in df
    if relative:
        print("  (rel: rank by the relative score tau / s, RelatIF)")
    for r in df.head(k).itertuples():
        rel = f"  rel={r.relative_rank:>4}" if relative else ""
        print(f"  {r.rank:>4}  tau={r.score:+.3e}{rel}  {r.item_id}  |  {r.caption}")
