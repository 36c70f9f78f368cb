"""Distributed scoring of every training latent (paper Eq. 1).

    tau_i = L(z_i, theta_unlearned; M_L) - L(z_i, theta0; M_L)

``ScoringModule`` runs in ``Trainer.predict`` over the latent store (``StorePredictDataModule``;
DDP over GPUs, or gloo processes on the CPU); each rank takes a disjoint slice of the items (no
padding duplicates). theta0 and theta_unlearned differ only in the tensors of the unlearned file:
both versions are kept and swapped in by assignment (no add/subtract round-off). L is the attribution
task's per-item loss. The baseline losses L(z_i, theta0) do not depend on the query, so they are
cached in ``<store>/baselines/``, keyed by everything they depend on (``baseline_key``; see
``musicattr.attribution.cache``), and reused by every later query. A ``PartsWriter`` writes each
rank's rows as they come (``<out_dir>/parts/``); a killed run resumes from them, and rank 0 merges
them into ``scores.parquet``: item_id, caption, file_name, score, score_se, rank, baseline_loss, unlearned_loss, ...

Each score carries its standard error from its own draws: with d_ij = L_{t_j}(z_i, theta_unlearned) -
L_{t_j}(z_i, theta0) over the T draws j (common random numbers),

    tau_i = mean_j d_ij,    SE_i = sd_j(d_ij) / sqrt(T)

(the per-draw baseline losses are cached with the means). Under stratified timesteps the draws are not
independent and SE_i is conservative (it ignores the variance the strata remove).

With ``relative``, the table also holds the relative score tau_i / s_i and its rank (see
``musicattr.attribution.sensitivity``); s_i is cached in ``<store>/sensitivity/`` like the baselines.

Precision. tau_i is the difference of two nearly equal losses (on the demo's q000 the median |tau| is
8e-5 of the mean loss, the largest 1.4e-3), so both are computed in theta0's own precision (float32) whatever
the Trainer's precision: under ``--trainer.precision bf16-mixed`` (or 16-mixed) Lightning's plugin runs
``predict_step`` under autocast, and ``full_precision`` switches autocast off again around every loss, the
sensitivity pass and the adaptive draws (and, on CUDA, TF32, which torch allows cuDNN by default). A bf16
forward carries a relative error of about 1e-4 to 2e-3 per loss (measured on the tests' tiny DiT), different
for theta0 and theta_unlearned, which would swamp the score; it would also write bf16 losses into the baseline
cache, whose key does not name the precision. So a scoring pass at bf16-mixed runs the 32-true pass's kernels
and gives its table (bit for bit on the CPU, tests/test_bf16_path.py), at float32's speed. Refused: the
``-true`` half precisions, which cast theta0 itself (fix: ``--trainer.precision 32-true``).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.attribution.cache import baseline_key, cache_path, read_cache, sensitivity_key, write_cache
from musicattr.attribution.masks import resolve_masks
from musicattr.attribution.preconditioner import DiagonalFisher
from musicattr.attribution.scores_table import scores_table
from musicattr.attribution.sensitivity import item_sensitivity
from musicattr.attribution.task import AttributionTask, load_theta
from musicattr.attribution.unlearn import load_unlearned
from musicattr.data.datamodules import item_slice
from musicattr.fingerprint import file_fingerprint
from musicattr.parts import Parts, PartsWriter, RunMismatchError, TableFormat

log = logging.getLogger(__name__)
__all__ = ["ScoringModule", "RunMismatchError", "merge_scores", "write_noise_report", "log_top", "full_precision",
           "check_scoring_precision", "swapped"]

# the Trainer precisions a scoring pass accepts (Lightning's names): the mixed ones run in float32 all the same
SCORING_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")


@contextlib.contextmanager
def full_precision(device: torch.device | str = "cpu"):
    """The losses of Eq. 1 (and anything cached beside them) in the weights' own precision, whatever the Lightning
    step runs under: autocast off for ``device``'s type and the CPU's and, on CUDA, no TF32 (torch lets cuDNN
    convolutions use TF32 by default, 10 mantissa bits like bf16's 7: the SAT DiT's 1x1 output convolution would
    round theta0's and theta_unlearned's outputs differently); the TF32 flags are restored on exit."""
    kind = torch.device(device).type
    with contextlib.ExitStack() as stack:
        for k in sorted({kind, "cpu"}):
            stack.enter_context(torch.autocast(k, enabled=False))
        if kind == "cuda":
            flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

            def restore():
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

            stack.callback(restore)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield


@contextlib.contextmanager
def swapped(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    """theta_unlearned in the model inside the block: each of ``params`` takes ``values[name]`` by assignment (no
    add/subtract round-off, so the theta0 side outside the block is theta0 bit for bit), restored on exit."""
    original = {k: p.data for k, p in params.items()}
    try:
        for k, p in params.items():
            p.data = values[k]
        yield
    finally:
        for k, p in params.items():
            p.data = original[k]


def check_scoring_precision(precision: str, stage: str = "attribute") -> None:
    """Refuse Trainer precisions that cast theta0 itself (the half ``-true`` ones)."""
    if precision not in SCORING_PRECISIONS:
        raise ValueError(f"{stage} cannot run at --trainer.precision {precision}: it casts theta0 itself, and Eq. 1's "
                         "score is a difference of two nearly equal losses that bf16 / float16 weights cannot "
                         "resolve; fix: --trainer.precision 32-true (bf16-mixed is accepted and computes the losses "
                         "in float32 all the same)")


class ScoringModule(L.LightningModule):
    """Scores the latent store against one unlearned model (with ``StorePredictDataModule``)."""

    def __init__(self, checkpoint: str, unlearned: str, out_dir: str, task: AttributionTask | None = None,
                 num_draws: int = 16, seed: int = 0, mask_loss: bool | None = None, draws_per_forward: int = 16,
                 use_baseline_cache: bool = True, flush_every: int = 10, top_k: int = 10, overwrite: bool = False,
                 relative: bool = False, fisher: str | None = None, adaptive_top_k: int = 0, adaptive_z: float = 2.0,
                 adaptive_step: int = 16, adaptive_budget: float = 1.0):
        """Args (beyond the obvious): ``task`` the attribution task (default: the SAT DiT of ``musicattr fit``);
        ``mask_loss`` M_L (default: from the unlearned file's strategy); ``relative`` adds tau_i / s_i (RelatIF)
        and its rank; it needs the Fisher of the unlearning run (``fisher``, default: the path recorded in the
        unlearned file). ``adaptive_top_k`` k > 0: after the pass, more draws (``adaptive_step`` per round) for the
        items whose score +- ``adaptive_z`` SE straddles the rank-k boundary, until none does or
        ``adaptive_budget`` x N T extra draws are spent (``musicattr.attribution.adaptive``; rank 0, resumable)."""
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.task, self.theta0 = load_theta(task, checkpoint)  # theta0 registered: Lightning moves it to the device
        self.changed, self.unlearn_meta = load_unlearned(unlearned)
        self.mask_loss = resolve_masks(self.unlearn_meta.get("strategy"), mask_loss=mask_loss)[1]
        self.checkpoint_fp = file_fingerprint(checkpoint)
        if "checkpoint_fingerprint" not in self.unlearn_meta:
            raise RunMismatchError(f"{unlearned} records no checkpoint fingerprint, so nothing ties it to "
                                   f"{checkpoint}; fix: rerun `musicattr unlearn` to rewrite it")
        if self.unlearn_meta["checkpoint_fingerprint"] != self.checkpoint_fp:
            raise RunMismatchError(f"{unlearned} was unlearned from another checkpoint than {checkpoint}; "
                                   "fix: pass the checkpoint it was made from")
        named = dict(self.task.net(self.theta0).named_parameters())
        unknown = [k for k in self.changed if k not in named]
        if unknown:
            raise RunMismatchError(f"{unlearned} names tensors absent from the model of {checkpoint}: {unknown[:3]}; "
                                   "fix: unlearn with the same task and checkpoint")
        self.params = {k: named[k] for k in self.changed}
        self.out_dir = Path(out_dir)
        self.baseline_cache: dict[int, np.ndarray] = {}
        self.sensitivity_cache: dict[int, float] = {}
        self.float_error: float | None = None
        if relative:
            self._init_relative(fisher or self.unlearn_meta.get("fisher"))
        self.parts = Parts(self.out_dir / "parts", TableFormat(), self.run_key, RunMismatchError(
            f"{self.out_dir} holds scores of another run (other unlearned weights, store, task, draws, seed or mask); "
            "fix: choose another out_dir, or pass --model.overwrite true to replace them"))

    def _init_relative(self, fisher: str | None) -> None:
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
        damping = float(self.unlearn_meta.get("damping", 1e-3))
        self.precond = DiagonalFisher.load(fisher, self.changed, damping, self.checkpoint_fp)
        self.fisher_fp, self.damping, self.ekfac_fp = fisher_fp, damping, None
        if self.unlearn_meta.get("preconditioner") == "ekfac":  # AbU+: s_i in the metric Eq. 2 used
            from musicattr.attribution.ekfac import EKFAC, factors_fingerprint

            folder = self.unlearn_meta["ekfac"]
            fp = factors_fingerprint(folder)
            if fp != self.unlearn_meta.get("ekfac_fingerprint"):
                raise RunMismatchError(f"{folder} holds other EK-FAC factors than {self.hparams.unlearned} was "
                                       "unlearned with; fix: rerun `musicattr unlearn` with these factors")
            self.precond = EKFAC.load(folder, self.changed, damping, fallback=self.precond,
                                      checkpoint_fingerprint=self.checkpoint_fp)
            self.ekfac_fp = fp

    # ---------------------------------------------------------------- keys
    @property
    def store(self):
        return self.trainer.datamodule.store

    def baseline_key(self, store=None) -> dict[str, Any]:
        """What L(z_i, theta0) depends on, beyond reduction order: the key of the baseline cache
        (``store``: default the pass's; the device is the one the pass runs on)."""
        h = self.hparams
        return baseline_key(self.checkpoint_fp, self.store if store is None else store, self.task, self.theta0,
                            h.num_draws, h.seed, self.mask_loss, self.device)

    def sensitivity_key(self, store=None) -> dict[str, Any]:
        """What s_i depends on: the baseline key, the Fisher, the unlearned tensors and the damping."""
        return sensitivity_key(self.baseline_key(store), self.fisher_fp, self.changed, self.damping, self.ekfac_fp)

    def run_key(self) -> dict[str, Any]:
        """What the rows of this run depend on (the key of its parts)."""
        return {**self.baseline_key(), "unlearned": self.unlearn_meta,
                "unlearned_fingerprint": file_fingerprint(self.hparams.unlearned), "relative": self.hparams.relative}

    # ---------------------------------------------------------------- the pass
    def configure_callbacks(self):
        check_scoring_precision(str(self.trainer.precision))  # before any part or cache is touched
        return [PartsWriter(self.parts, self.merge, self.hparams.flush_every, self.hparams.overwrite)]

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.endswith("-mixed"):
            log.info("attribute: --trainer.precision %s: the losses of Eq. 1 are computed in float32 all the same "
                     "(autocast off; see musicattr.attribution.score)", precision)
        self.prepare(self.device)
        root = self.store.root
        self.keys = {"baselines": self.baseline_key(), "run": self.run_key()}  # kept: at merge time the model is on the CPU
        if self.hparams.relative:
            self.keys["sensitivity"] = self.sensitivity_key()
        self.cache_paths = {kind: cache_path(root, kind, key) for kind, key in self.keys.items() if kind != "run"}
        if self.hparams.use_baseline_cache:
            self.baseline_cache = read_cache(self.cache_paths["baselines"], "baseline_draws")
            if self.hparams.relative:
                self.sensitivity_cache = read_cache(self.cache_paths["sensitivity"], "sensitivity")

    def prepare(self, device: torch.device | str = "cpu") -> None:
        """Move theta0 to ``device`` and keep both versions of the unlearned tensors there (no Trainer needed)."""
        self.theta0.to(device)
        # theta0's own tensors (no copy: ``use`` swaps by assignment and nothing writes into them)
        self.original = {k: p.detach() for k, p in self.params.items()}
        self.unlearned_values = {k: v.to(device, self.params[k].dtype) for k, v in self.changed.items()}
        if self.hparams.relative:
            self.precond.to(device)

    def use(self, unlearned: bool) -> None:
        """Swap theta_unlearned (or theta0) into the model's unlearned tensors, by assignment."""
        values = self.unlearned_values if unlearned else self.original
        for k, p in self.params.items():
            p.data = values[k]

    def draw_losses(self, batch) -> torch.Tensor:
        """L_{t_j}(z_b, theta; M_L) at the tensors in place (see ``use``): float64 [B, T], the scoring draws."""
        h = self.hparams
        return self.task.draw_losses(self.theta0, batch, h.seed, h.num_draws, mask=self.mask_loss,
                                     draws_per_forward=h.draws_per_forward)

    def loss(self, batch) -> torch.Tensor:
        """L(z_b, theta; M_L) at the tensors in place: float64 [B], the mean of ``draw_losses``."""
        return self.draw_losses(batch).mean(1)

    def float_error_probe(self, batch, baseline: torch.Tensor, n: int = 4) -> float:
        """Float error of a loss: L(z_i, theta0) recomputed item by item (other reductions than in the
        batch) against the batched / cached value. Scores far below it are not measurable."""
        self.use(unlearned=False)
        diffs = [abs(float(self.loss(item_slice(batch, j))[0]) - float(baseline[j]))
                 for j in range(min(n, len(batch["index"])))]
        return max(max(diffs), float(torch.finfo(torch.float32).eps) * float(baseline.abs().max()))

    def sensitivity(self, batch, idx: list[int]) -> np.ndarray:
        """s_i at theta0 (cached, or one backward pass per item)."""
        if all(i in self.sensitivity_cache for i in idx):
            return np.array([self.sensitivity_cache[i] for i in idx], dtype=np.float64)
        self.use(unlearned=False)
        h = self.hparams
        return item_sensitivity(self.task, self.theta0, self.params, self.precond, batch, h.seed, h.num_draws,
                                mask=self.mask_loss, draws_per_forward=h.draws_per_forward).numpy()

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any]:
        with full_precision(self.device):
            return self._predict(batch)

    def _predict(self, batch) -> dict[str, Any]:
        idx = [int(i) for i in batch["index"]]
        with torch.no_grad():
            self.use(unlearned=True)
            unlearned = self.draw_losses(batch).cpu()
            if all(i in self.baseline_cache for i in idx):
                baseline = torch.tensor(np.stack([self.baseline_cache[i] for i in idx]), dtype=torch.float64)
            else:
                self.use(unlearned=False)
                baseline = self.draw_losses(batch).cpu()
            if self.float_error is None:
                self.float_error = self.float_error_probe(batch, baseline.mean(1))
        d = unlearned - baseline  # d_ij: the same draws on both sides
        se = d.std(1, correction=1) / d.shape[1] ** 0.5 if d.shape[1] > 1 else torch.full((len(idx),), float("nan"))
        out = {"index": idx, "baseline_loss": baseline.mean(1).numpy(), "unlearned_loss": unlearned.mean(1).numpy(),
               "score_se": se.numpy(), "baseline_draws": list(baseline.numpy())}
        if self.hparams.relative:
            out["sensitivity"] = self.sensitivity(batch, idx)
        return out

    def refine(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Adaptive draws at the top-k boundary (``musicattr.attribution.adaptive``); rows with ``num_draws``."""
        import hashlib
        import json

        from musicattr.attribution.adaptive import DrawSums, refine
        from musicattr.data.datamodules import collate_items

        h = self.hparams
        store = self.store
        pos_of = {int(i): p for p, i in enumerate(store.items["index"])}
        device = next(self.theta0.parameters()).device  # the merge may run after the model left the device
        self.original = {k: v.to(device) for k, v in self.original.items()}
        self.unlearned_values = {k: v.to(device) for k, v in self.unlearned_values.items()}

        def extra(indices: list[int], first: int, n: int):
            batch = collate_items([store[pos_of[i]] for i in indices])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            kw = dict(mask=self.mask_loss, draws_per_forward=h.draws_per_forward, draw_offset=first)
            with torch.no_grad(), full_precision(device):
                self.use(unlearned=True)
                lu = self.task.draw_losses(self.theta0, batch, h.seed, n, **kw).cpu().numpy()
                self.use(unlearned=False)
                l0 = self.task.draw_losses(self.theta0, batch, h.seed, n, **kw).cpu().numpy()
            return lu, l0

        rows = rows.sort_values("index").reset_index(drop=True)
        rows["score"] = rows["unlearned_loss"] - rows["baseline_loss"]
        sums = DrawSums.from_table(rows, h.num_draws)
        settings = {"run": self.keys["run"], "k": h.adaptive_top_k, "z": h.adaptive_z, "step": h.adaptive_step}
        digest = hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()
        self.adaptive_rounds = refine(sums, extra, self.out_dir / "adaptive" / digest, h.adaptive_top_k,
                                      h.adaptive_z, h.adaptive_step, h.adaptive_budget)
        return rows.assign(unlearned_loss=sums.sum_u / sums.n, baseline_loss=sums.sum_0 / sums.n, score_se=sums.se,
                           num_draws=sums.n.astype(np.int64))

    def merge(self, parts: Parts) -> pd.DataFrame:
        first = parts.format.read(parts.files())
        rows = self.refine(first) if self.hparams.adaptive_top_k > 0 else first.assign(num_draws=self.hparams.num_draws)
        df = merge_scores(rows, parts.folder, self.store, self.unlearn_meta.get("query_id"), self.hparams.relative)
        with atomic_path(self.out_dir / "scores.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        if self.hparams.use_baseline_cache:
            if not self.baseline_cache:
                cache = first[["index", "baseline_loss", "baseline_draws"]].astype({"index": int})  # the T draws
                write_cache(cache, self.cache_paths["baselines"], self.keys["baselines"])
            if self.hparams.relative and not self.sensitivity_cache:
                write_cache(df[["index", "sensitivity"]], self.cache_paths["sensitivity"], self.keys["sensitivity"])
        write_noise_report(df, self.float_error, self.out_dir / "noise.json", self.hparams.top_k)
        if self.hparams.adaptive_top_k > 0:
            h = self.hparams
            self.keys["run"]["adaptive"] = {"top_k": h.adaptive_top_k, "z": h.adaptive_z, "step": h.adaptive_step,
                                            "budget": h.adaptive_budget, "rounds": self.adaptive_rounds,
                                            "draws": int(df["num_draws"].sum()), "first_pass_draws": len(df) * h.num_draws}
        atomic_write_json(self.out_dir / "run.json", {**self.keys["run"], "store": str(self.store.root.resolve()),
                                                      "checkpoint": self.hparams.checkpoint})
        log_top(df, self.hparams.top_k)
        return df


def merge_scores(rows: pd.DataFrame, folder, store, query_id: str | None, relative: bool) -> pd.DataFrame:
    """One row per training item, ranked by tau (1 = most influenced); with ``relative`` also by tau / s."""
    rows = rows.copy()
    rows["index"] = rows["index"].astype(int)
    missing = set(store.items["index"].astype(int)) - set(rows["index"])
    if missing:
        raise RuntimeError(f"{len(missing)} items have no score in {folder}; fix: rerun to resume")
    if relative and ("sensitivity" not in rows or rows["sensitivity"].isna().any()):
        raise RuntimeError(f"{folder} holds scores without sensitivities (written by a run without "
                           "relative); fix: rerun with --model.overwrite true")
    if "score_se" not in rows:
        raise RuntimeError(f"{folder} holds scores written before scores had standard errors; fix: rerun with "
                           "--model.overwrite true")
    rows["score"] = rows["unlearned_loss"].astype(np.float64) - rows["baseline_loss"]
    return ranked_table(store, rows, query_id, relative, "unlearning")


def ranked_table(store, rows: pd.DataFrame, query_id: str | None, relative: bool, method: str) -> pd.DataFrame:
    """The scoring table (``scores.parquet``, the schema of :mod:`musicattr.attribution.scores_table`): the
    store's items joined with ``rows`` (index, baseline_loss, unlearned_loss, score, and score_se, num_draws and
    sensitivity where given), ranked by score (rank 1 = largest; ties by index) and, with ``relative``, by
    score / sensitivity (relative_rank, its standard error score_se / s)."""
    items = store.items[store.items["index"].astype(int).isin(set(rows["index"].astype(int)))]
    r = rows.set_index(rows["index"].astype(int)).loc[items["index"].astype(int)]
    extra = {c: r[c].to_numpy() for c in ("num_draws", "sensitivity") if c in r and (c != "sensitivity" or relative)}
    return scores_table(items, r["score"].to_numpy(), method, query_id,
                        score_se=r["score_se"].to_numpy() if "score_se" in r else None,
                        baseline_loss=r["baseline_loss"].to_numpy(), unlearned_loss=r["unlearned_loss"].to_numpy(),
                        extra=extra, relative=relative)


SEPARATION_Z = 2.0  # "clear of": a gap larger than 2 combined standard errors (about 95% one-sided, normal)


def separated(df: pd.DataFrame, k: int, z: float = SEPARATION_Z) -> int | None:
    """How many of the top k (by ``score``) lie above the (k+1)-th by more than z combined standard errors,
    score_i - score_{k+1} > z sqrt(SE_i^2 + SE_{k+1}^2); None without standard errors or k + 1 rows."""
    if "score_se" not in df or len(df) <= k or k <= 0:
        return None
    ranked = df.sort_values("rank") if "rank" in df else df
    top, nxt = ranked.head(k), ranked.iloc[k]
    combined = np.sqrt(top["score_se"].to_numpy() ** 2 + float(nxt["score_se"]) ** 2)
    return int((top["score"].to_numpy() - float(nxt["score"]) > z * combined).sum())


def write_noise_report(df: pd.DataFrame, float_error: float | None, path: Path, top_k: int = 10) -> dict:
    """How large the scores are against their draw noise (the standard errors) and against the float error
    of the two losses (the floor below which nothing is measurable)."""
    tau = df["score"].abs()
    report = {"float_error": float_error, "median_abs_score": float(tau.median()), "max_abs_score": float(tau.max()),
              "baseline_loss_mean": float(df["baseline_loss"].mean())}
    if "score_se" in df:
        report.update(median_score_se=float(df["score_se"].median()),
                      above_2se=int((df["score"] > SEPARATION_Z * df["score_se"]).sum()),
                      **{f"top{k}_separated": separated(df, k) for k in sorted({10, top_k}) if k > 0})
    if float_error:
        report["median_score_over_float_error"] = report["median_abs_score"] / float_error
        report["top_score_over_float_error"] = report["max_abs_score"] / float_error
        if report["max_abs_score"] < 100 * float_error:
            log.warning("the largest |tau| (%.2e) is within 100x of the float error of the losses (%.2e); "
                        "fix: raise the unlearning lr or steps", report["max_abs_score"], float_error)
    atomic_write_json(path, report)
    return report


def log_top(df: pd.DataFrame, k: int) -> None:
    """Log (the CLI shows it) the k best-scored training items with their standard errors, and how many of
    them are clear of the (k+1)-th; nothing for k = 0."""
    if k <= 0:
        return
    if df.empty:
        log.info("no training items were scored")
        return
    method = f", {df['method'].iloc[0]}" if df["method"].iloc[0] != "unlearning" else ""
    lines = [f"\nTop-{k} training tracks by attribution score tau (query {df['query_id'].iloc[0]!r}{method}):"]
    relative = "relative_rank" in df
    if relative:
        lines.append("  (rel: rank by the relative score tau / s, RelatIF)")
    se = "score_se" in df
    for r in df.head(k).itertuples():
        rel = f"  rel={r.relative_rank:>4}" if relative else ""
        err = f" +- {r.score_se:.1e}" if se else ""
        lines.append(f"  {r.rank:>4}  tau={r.score:+.3e}{err}{rel}  {r.item_id}  |  {r.caption}")
    n = separated(df, k)
    if n is not None:
        lines.append(f"  {n} of the top {k} are clear of rank {k + 1} by more than {SEPARATION_Z:g} combined standard "
                     f"errors (the rest may trade places with it under other draws)")
    log.info("\n".join(lines))
