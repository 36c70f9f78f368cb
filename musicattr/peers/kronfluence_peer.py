"""EK-FAC influence through kronfluence (Grosse et al., 2023; for diffusion: Mlodozeniec et al., 2024).

    score(q, i) = grad_theta f(q)^T (G + lambda)^-1 grad_theta L(z_i)                   over the tracked linear layers

with L(z_i) = 1/T sum_j L_{t_j}(z_i) the training loss of item i over its T fixed scoring draws (the bare-id draws of
Eq. 1), f(q) = 1/K sum_j L_{t_j}(z_hat) the query's loss over the K draws Eq. 2 unlearns with (``unlearn/<id>``, mask
M_U), and G the EK-FAC curvature fitted on the training store: one example per (item, draw) of the Fisher's own
draws (``fisher/<id>``), the empirical Fisher of the per-draw loss (``fisher: empirical``, the diagonal Fisher's
kind, so that Eq. 2 can take it on the same scale) or the true Fisher with targets sampled from the model
(``fisher: sampled``: pred + N(0, 1/2), kronfluence's regression recipe). lambda: kronfluence's heuristic
(0.1 x mean eigenvalue per layer) unless ``damping`` is given.

Sign: kronfluence's pairwise score is positive when up-weighting item i lowers the query loss (the item helps the
query): larger = more credit, as Eq. 1's tau (to first order tau_i = lr/N grad L(z_i)^T P grad L(z_hat) > 0 for the
same alignment).

How the draws meet kronfluence's per-example gradients: kronfluence takes per-example gradients over the leading
axis of each tracked layer's input. The adapter calls the network once per draw with the batch's items as rows and
declares ``has_shared_parameters`` so kronfluence sums each item's per-draw gradients; ``post_process_per_sample_
gradient`` is the identity (it routes the pairwise scores through kronfluence's accumulating path, which adds the
per-call scores: the score of the summed gradient, by linearity).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from musicattr.attribution.loss import FISHER, UNLEARN, draw_keys, masked_mse
from musicattr.fingerprint import settings_key
from musicattr.peers.common import concat_batches, made_seconds, record_made

log = logging.getLogger(__name__)


class BatchList(Dataset):
    """One-item batches as a dataset (``concat_batches`` collates them); ``draws``: (batch position, draw j) rows."""

    def __init__(self, batches: Sequence[Mapping[str, Any]], draws: int | None = None):
        self.batches = list(batches)
        self.rows = [(i, None) for i in range(len(self.batches))] if draws is None else \
            [(i, j) for i in range(len(self.batches)) for j in range(draws)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = self.rows[k]
        b = dict(self.batches[i])
        if j is not None:
            b["draw"] = torch.tensor([j])
        return b


def _kronfluence_task_class():
    from kronfluence.task import Task

    class DiffusionInfluenceTask(Task):
        """kronfluence's ``Task`` from the project's ``AttributionTask`` (the model is kronfluence's argument)."""

        enable_post_process_per_sample_gradient = True

        def __init__(self, task, modules: Sequence[str], seed: int = 0, train_draws: int = 32,
                     query_draws: int = 128, query_mask: bool = True, train_mask: bool = False,
                     fit_mask: bool = False, fit_seed: int | None = None):
            self.task, self.modules, self.seed = task, list(modules), seed
            self.fit_seed = seed if fit_seed is None else fit_seed
            self.train_draws, self.query_draws = train_draws, query_draws
            self.query_mask, self.train_mask, self.fit_mask = query_mask, train_mask, fit_mask

        def one_draw(self, model, batch, namespace: str, draws: Sequence[int], mask: bool, cond, sample=False):
            """L_{t_j}(z_b) for row b's draw ``draws[b]`` (one network call, the items as rows) -> [B]."""
            z = batch["latents"]
            keys = draw_keys(namespace, batch["item_id"])
            seed = self.fit_seed if namespace == FISHER else self.seed
            pairs = [self.task.draws(seed, [k], [int(j)], tuple(z.shape[1:])) for k, j in zip(keys, draws)]
            t = torch.cat([p[0].reshape(1) for p in pairs]).to(z)
            eps = torch.cat([p[1].reshape(1, *z.shape[1:]) for p in pairs]).to(z)
            z_t, target = self.task.noise(z, t, eps)
            pred = self.task.predict(model, z_t, t, cond)
            if sample:  # the true Fisher: targets drawn from the model's Gaussian, N(pred, 1/2) for a squared error
                with torch.no_grad():
                    target = pred.detach() + math.sqrt(0.5) * torch.randn_like(pred)
            m = self.task.frame_mask(model, batch) if mask else None
            return masked_mse(pred, target, m)

        def averaged(self, model, batch, namespace: str, draws: int, mask: bool) -> torch.Tensor:
            with torch.no_grad():
                cond = self.task.conditioning(model, batch)
            b = len(batch["item_id"])
            total = 0.0
            for j in range(draws):
                total = total + self.one_draw(model, batch, namespace, [j] * b, mask, cond).sum()
            return total / draws

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            if "draw" in batch:  # factor fitting: one (item, draw) example per row, the Fisher's draws
                with torch.no_grad():
                    cond = self.task.conditioning(model, batch)
                return self.one_draw(model, batch, FISHER, batch["draw"].tolist(), self.fit_mask, cond, sample).sum()
            return self.averaged(model, batch, "", self.train_draws, self.train_mask)

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.averaged(model, batch, UNLEARN, self.query_draws, self.query_mask)

        def get_influence_tracked_modules(self):
            return self.modules

        def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
            return gradient

    return DiffusionInfluenceTask


def analyzer_on_cpu(device: str) -> bool:
    """kronfluence's ``cpu`` flag for ``device`` ('cpu' or 'cuda'; kronfluence moves the model and batches)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device = {device!r}; fix: 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no GPU here; fix: --device cpu (or run on a GPU machine)")
    return device == "cpu"


def make_analyzer(task, model, modules: Sequence[str], work_dir: str | Path, device: str = "cpu", **task_kw):
    """(kronfluence Analyzer over ``model`` prepared in place, the adapter task); ``device``: where kronfluence
    fits and scores ('cpu' or 'cuda')."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    cpu = analyzer_on_cpu(device)
    ktask = _kronfluence_task_class()(task, modules, **task_kw)
    model = prepare_model(model, ktask)
    analyzer = Analyzer(analysis_name="ekfac", model=model, task=ktask, cpu=cpu, disable_tqdm=True,
                        output_dir=str(work_dir), disable_model_save=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=concat_batches, num_workers=0))
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    return analyzer, ktask


def fit_factors(analyzer, train_batches, layers: Mapping[str, Mapping[str, Any]], fit_draws: int, batch_size: int,
                fisher: str, provenance: Mapping[str, Any]) -> tuple[str, Path, float | None, bool]:
    """Fit EK-FAC factors on (item, draw) examples (skipped when fitted with the same settings); write the layer
    mapping (``musicattr_ekfac.json``) beside them. Returns (factors name, folder, seconds the fit took, reused):
    when reused, the seconds recorded by the run that fitted them (None if it kept no record)."""
    from kronfluence.arguments import FactorArguments

    from musicattr.attribution.ekfac import MAPPING_FILE

    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher = {fisher!r}; fix: 'empirical' or 'sampled'")
    fit = {"strategy": "ekfac", "fisher": fisher, "fit_draws": fit_draws, "namespace": FISHER,
           "modules": sorted(layers), **provenance}
    name = "f" + settings_key(fit)
    folder = analyzer.factors_output_dir(name)
    t0 = time.time()
    if not (folder / MAPPING_FILE).exists():
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical", has_shared_parameters=True,
                               covariance_max_examples=None, lambda_max_examples=None)
        log.info("peers/ekfac: fitting EK-FAC factors on %d items x %d draws (%d linear layers) -> %s",
                 len(train_batches), fit_draws, len(layers), folder)
        torch.manual_seed(0)
        analyzer.fit_all_factors(factors_name=name, dataset=BatchList(train_batches, fit_draws),
                                 per_device_batch_size=batch_size, factor_args=args, overwrite_output_dir=True)
        seconds = time.time() - t0
        record_made(folder, seconds)
        (folder / MAPPING_FILE).write_text(json.dumps({"modules": dict(layers), "fit": fit, **provenance}, indent=1))
        log.info("peers/ekfac: factors fitted in %.0f s", seconds)
        return name, folder, seconds, False
    log.info("peers/ekfac: factors %s up to date: reused", folder)
    return name, folder, made_seconds(folder), True


def pairwise_scores(analyzer, factors_name: str, query_batches, train_batches, batch_size: int,
                    damping: float | None, scores_key: str, query_batch_size: int = 4) -> np.ndarray:
    """kronfluence's pairwise scores [Q, N] (query x training item), summed over the tracked layers.

    Queries go ``query_batch_size`` at a time (a query's K draws are K network calls whose graphs are held until
    its backward pass: 46 queries x 128 draws at once took 13.7 GB and were killed), their preconditioned gradients
    accumulated (``query_gradient_accumulation_steps``) so that the training items are passed over once."""
    from kronfluence.arguments import ScoreArguments

    qbs = max(1, min(query_batch_size, len(query_batches)))
    args = ScoreArguments(damping_factor=damping, query_gradient_accumulation_steps=-(-len(query_batches) // qbs))
    name = f"s{scores_key}"
    analyzer.compute_pairwise_scores(scores_name=name, factors_name=factors_name, query_dataset=BatchList(query_batches),
                                     train_dataset=BatchList(train_batches), per_device_query_batch_size=qbs,
                                     per_device_train_batch_size=batch_size, score_args=args, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()
