"""TRAK and D-TRAK through traker (Park et al., 2023; Zheng et al., 2024), with traker's CPU projector.

TRAK scores a query q against training item i through projected gradients of a model output f:

    phi(z) = P^T grad_theta f(z, theta0)           (BasicProjector: a seeded Gaussian k x p matrix, built in blocks)
    score(q, i) = phi(q)^T (Phi^T Phi + lambda)^-1 phi(i) * Q_i    (traker's finalize_features / score; Q_i = 1 here)

lambda = damping x the mean eigenvalue of Phi^T Phi (traker's lambda_reg): with N training items fewer than the
k projected dimensions Phi^T Phi is singular and traker's unregularised inverse returns noise.

over the target group's parameters. The model output f of one latent is an average over T fixed draws (t_j, eps_j):

    trak:   f(z) = 1/T sum_j L_{t_j}(z)                     the diffusion loss itself (D-TRAK's "TRAK" baseline)
    dtrak:  f(z) = 1/T sum_j || eps_theta(z_{t_j}, t_j) ||^2 / |M|   the squared norm of the prediction (D-TRAK)

training items with the bare-id draws of Eq. 1 (mask M_L off), queries with Eq. 2's draws (``unlearn/<id>``, M_U on).
The out-to-loss term Q is 1 for both (D-TRAK's choice; with f the loss itself no reweighting applies).

Sign: for both outputs the same f is differentiated on both sides, so aligned gradients give a positive score: the
item helps the query (larger = more credit, as Eq. 1's tau).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from musicattr.attribution.loss import UNLEARN, draw_keys
from musicattr.peers.common import concat_batches, made_seconds, record_made

log = logging.getLogger(__name__)
OUTPUTS = ("trak", "dtrak")
FEATURES_KEY = "features_key.json"     # beside traker's files: the settings its training features were made with
EXPERIMENT = "queries"                # traker's experiment name for a run's queries


def _model_output_class():
    from trak.modelout_functions import AbstractModelOutput

    class DiffusionModelOutput(AbstractModelOutput):
        """f(z) of one latent over its draws (see the module docstring); ``kind`` 'trak' (loss) or 'dtrak' (norm)."""

        def __init__(self, task, theta, kind: str, cond_keys: Sequence[str], cond_const: Mapping[str, Any]):
            if kind not in OUTPUTS:
                raise ValueError(f"model output {kind!r}; fix: one of {OUTPUTS}")
            self.task, self.theta, self.kind = task, theta, kind
            self.cond_keys, self.cond_const = list(cond_keys), dict(cond_const)

        def get_output(self, model, weights, buffers, latents, t, eps, mask, *cond_values) -> torch.Tensor:
            d = t.shape[0]
            z = latents.unsqueeze(0).expand(d, *latents.shape)
            cond = {k: v.unsqueeze(0).expand(d, *v.shape) for k, v in zip(self.cond_keys, cond_values)}
            cond.update(self.cond_const)
            z_t, target = self.task.noise(z, t, eps)
            pred = self.task.predict(self.theta, z_t, t, cond, params=weights)
            value = (pred - target) if self.kind == "trak" else pred
            se = value.float().pow(2)
            se = se.mean(tuple(range(1, se.dim() - 1)))                       # [D, L]
            m = mask.to(se.dtype)
            per_draw = (se * m).sum(-1) / m.sum().clamp_min(1.0)
            return per_draw.mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
            return torch.ones(batch[0].shape[0], 1, dtype=batch[0].dtype, device=batch[0].device)

    return DiffusionModelOutput


def trak_inputs(task, model, batch: Mapping[str, Any], seed: int, draws: int, namespace: str, mask: bool
                ) -> tuple[tuple[torch.Tensor, ...], list[str], dict]:
    """traker's batch tuple (latents, t [B, T], eps [B, T, ...], frame mask [B, L], *conditioning tensors) and the
    conditioning's tensor keys and constants."""
    z = batch["latents"]
    t, eps = task.draws(seed, draw_keys(namespace, batch["item_id"]), range(draws), tuple(z.shape[1:]))
    with torch.no_grad():
        cond = task.conditioning(model, batch)
    keys = [k for k, v in cond.items() if torch.is_tensor(v)]
    const = {k: v for k, v in cond.items() if not torch.is_tensor(v)}
    m = task.frame_mask(model, batch) if mask else torch.ones(z.shape[0], z.shape[-1], dtype=torch.bool)
    return (z, t.to(z), eps.to(z), m.float(), *[cond[k].detach() for k in keys]), keys, const


def trak_scores(task, model, kind: str, train_batches: Sequence[Mapping[str, Any]],
                query_batches: Sequence[Mapping[str, Any]], work_dir: str | Path, target: str = "all",
                proj_dim: int = 2048, seed: int = 0, proj_seed: int = 0, train_draws: int = 32,
                query_draws: int = 128, query_mask: bool = True, batch_size: int = 16, query_batch_size: int = 4,
                block_size: int = 128, damping: float = 1e-3, query_namespace: str = UNLEARN,
                features_key: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """TRAK scores [Q, N] (query x training item) with traker's BasicProjector on the CPU; (scores, costs): costs
    ``featurize_s`` (the seconds the training features took; when finished features are reused, as recorded by the
    run that finished them), ``features_reused`` and ``score_s``. ``features_key``: what the training
    features depend on beyond these arguments (checkpoint, store, items); with it, features finalized in ``work_dir``
    under the same key are reused (only the queries are scored), and an interrupted featurisation resumes; without it
    every run featurizes afresh."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    net = task.net(model)
    params = task.select_parameters(model, target)
    grad_dim = sum(p.numel() for p in params.values())
    work = Path(work_dir)
    block_size = max(1, min(block_size, proj_dim // 2))
    key = None if features_key is None else json.loads(json.dumps(
        {**features_key, "kind": kind, "target": target, "proj_dim": proj_dim, "seed": seed, "proj_seed": proj_seed,
         "train_draws": train_draws, "block_size": block_size, "damping": damping, "items": len(train_batches)},
        sort_keys=True, default=str))
    key_file = work / FEATURES_KEY
    reuse = key is not None and key_file.exists() and json.loads(key_file.read_text()) == key
    if work.exists() and not reuse:
        shutil.rmtree(work)  # features of other settings (or none recorded): traker would load them as they are
    work.mkdir(parents=True, exist_ok=True)
    for stale in (work / "scores" / f"{EXPERIMENT}.mmap", work / "0" / f"{EXPERIMENT}_grads.mmap"):
        stale.unlink(missing_ok=True)           # the last run's queries: this run scores its own
    if key is not None and not reuse:
        key_file.write_text(json.dumps(key, indent=1))
    finished = made_seconds(work) if reuse else None      # features this key finalized earlier (None: not yet)
    if reuse:
        log.info("peers/%s: training features in %s have this key: reused (featurized items are skipped)", kind, work)
    # at least two blocks (block_size above): traker 0.3.2's finalize_features frees a one-block projector's matrix
    # and project() then fails (AttributeError: 'BasicProjector' object has no attribute 'proj_matrix')
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=proj_seed, proj_type=ProjectionType.normal,
                               device=torch.device("cpu"), block_size=block_size, dtype=torch.float32)
    probe, keys, const = trak_inputs(task, model, train_batches[0], seed, 1, "", False)
    output = _model_output_class()(task, model, kind, keys, const)
    logging.getLogger("TRAK").setLevel(logging.WARNING)
    traker = TRAKer(model=net, task=output, train_set_size=len(train_batches), save_dir=str(work), device="cpu",
                    projector=projector, proj_dim=proj_dim, use_half_precision=False, grad_wrt=list(params),
                    load_from_save_dir=True, logging_level=logging.WARNING)  # False skips experiments.json (traker 0.3.2)
    t0 = time.time()
    traker.load_checkpoint(net.state_dict(), model_id=0)
    for start in range(0, len(train_batches), batch_size):
        chunk = concat_batches(train_batches[start:start + batch_size])
        inputs, _, _ = trak_inputs(task, model, chunk, seed, train_draws, "", False)
        traker.featurize(batch=inputs, num_samples=len(chunk["item_id"]))
        log.info("peers/%s: featurized %d of %d training items (%.0f s)", kind,
                 min(start + batch_size, len(train_batches)), len(train_batches), time.time() - t0)
    grads = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
    traker.score_computer.lambda_reg = float(damping * (grads ** 2).sum() / grads.shape[1])  # damping x mean eig
    traker.finalize_features()
    t1 = time.time()
    if finished is None:
        record_made(work, t1 - t0)   # this run finished them (all, or the rest of an interrupted featurisation)
    traker.start_scoring_checkpoint(exp_name=EXPERIMENT, checkpoint=net.state_dict(), model_id=0,
                                    num_targets=len(query_batches))
    for start in range(0, len(query_batches), query_batch_size):
        chunk = concat_batches(query_batches[start:start + query_batch_size])
        inputs, _, _ = trak_inputs(task, model, chunk, seed, query_draws, query_namespace, query_mask)
        traker.score(batch=inputs, num_samples=len(chunk["item_id"]))
    scores = np.asarray(traker.finalize_scores(exp_name=EXPERIMENT), dtype=np.float64).T   # [Q, N]
    return scores, {"featurize_s": t1 - t0 if finished is None else finished, "features_reused": finished is not None,
                    "score_s": time.time() - t1}
