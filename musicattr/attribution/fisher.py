"""Diagonal Fisher information of theta0 (paper Section 2.2).

    F_jj = 1/N sum_i 1/T sum_t ( dL_t(z_i, theta) / dtheta_j )^2

with L_t the single-draw loss of the attribution task (``AttributionTask.draw_loss``): per-item,
per-timestep squared gradients, never the square of a batch-mean gradient. The draws of item i
are keyed ``fisher/<id>``: the Fisher never reuses the scoring draws of the same item.
Per-sample gradients come from torch.func (vmap over grad) or, as the reference, a loop.

``musicattr fisher`` is one prediction pass over the latent store (``FisherModule`` with the
store's ``StorePredictDataModule``): each batch returns its sums of squared gradients, the
``PartsWriter`` adds them up per rank and writes parts to ``<out>.parts/`` (a killed run resumes
by skipping the items already summed), and rank 0 merges the parts (float64) into ``<out>``
(safetensors, with metadata naming the checkpoint, store, task, N, T, seed, mask and parameters).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.func import grad, vmap

from musicattr.atomic import atomic_path
from musicattr.attribution.loss import FISHER, repeat_conditioning
from musicattr.attribution.task import AttributionTask, attach_task
from musicattr.parts import Parts, PartsWriter, TensorFormat

log = logging.getLogger(__name__)


class FisherMismatchError(RuntimeError):
    pass


def _examples(task: AttributionTask, model, batch, seed: int, draws, namespace: str, mask: bool):
    """Flatten items x draws into single-draw examples (z, t, eps, cond, mask), item-major."""
    z = batch["latents"]
    b, d = z.shape[0], len(draws)
    t, eps = task.draws(seed, task.draw_keys(namespace, batch["item_id"]), draws, tuple(z.shape[1:]))
    with torch.no_grad():
        cond = task.conditioning(model, batch)
    c = {k: v for k, v in repeat_conditioning(cond, d).items() if v is not None}
    m = task.frame_mask(model, batch).repeat_interleave(d, 0) if mask else None
    return z.repeat_interleave(d, 0), t.reshape(-1).to(z), eps.reshape(b * d, *z.shape[1:]).to(z), c, m


def squared_grads_vmap(task: AttributionTask, model, params: Mapping[str, torch.Tensor], batch, seed: int, draws, *,
                       namespace: str = FISHER, mask: bool = False, chunk_size: int | None = 16
                       ) -> dict[str, torch.Tensor]:
    """sum over items and draws of (dL_t(z_i)/dtheta)^2 (float64), per-sample gradients by vmap(grad).

    Examples are processed ``chunk_size`` at a time and squared-summed at once, so memory holds at most
    ``chunk_size`` per-sample gradients."""
    z, t, eps, c, m = _examples(task, model, batch, seed, draws, namespace, mask)
    detached = {k: v.detach() for k, v in params.items()}

    def single(p, z1, t1, e1, c1, m1):
        kw = {k: v[None] for k, v in c1.items()}
        return task.draw_loss(model, z1[None], t1[None], e1[None], kw, None if m1 is None else m1[None], params=p)[0]

    per_sample = vmap(grad(single), in_dims=(None, 0, 0, 0, 0, None if m is None else 0))
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in detached.items()}
    step = chunk_size or z.shape[0]
    for a in range(0, z.shape[0], step):
        sl = slice(a, a + step)
        g = per_sample(detached, z[sl], t[sl], eps[sl], {k: v[sl] for k, v in c.items()}, None if m is None else m[sl])
        for k, v in g.items():
            out[k] += v.double().pow(2).sum(0)
    return out


def squared_grads_loop(task: AttributionTask, model, params: Mapping[str, torch.Tensor], batch, seed: int, draws, *,
                       namespace: str = FISHER, mask: bool = False) -> dict[str, torch.Tensor]:
    """Reference: the same sum with one backward pass per (item, draw)."""
    z, t, eps, c, m = _examples(task, model, batch, seed, draws, namespace, mask)
    names = list(params)
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for n in range(z.shape[0]):
        one = slice(n, n + 1)
        with torch.enable_grad():
            loss = task.draw_loss(model, z[one], t[one], eps[one], {k: v[one] for k, v in c.items()},
                                  None if m is None else m[one])[0]
            grads = torch.autograd.grad(loss, [params[k] for k in names])
        for k, gk in zip(names, grads):
            out[k] += gk.double().pow(2)
    return out


def merge_fisher(parts: Parts, out: Path, key: dict[str, Any], names: list[str]) -> None:
    """F = (sum of part sums) / (N T), each item counted once; writes ``out`` (safetensors)."""
    total: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for p in parts.files():
        idx, sums = parts.format.read(p)
        if seen.intersection(idx):
            raise RuntimeError(f"{p} repeats items already summed; fix: delete {parts.folder} and rerun")
        seen.update(idx)
        for k, v in sums.items():
            total[k] = total[k] + v if k in total else v
    n, t = len(seen), int(key["num_draws"])
    fisher = {k: (total[k] / (n * t)).float().contiguous() for k in names}
    meta = {k: json.dumps(v) for k, v in {**key, "num_items": n, "parameters": names}.items()}
    with atomic_path(out) as tmp:
        save_file(fisher, str(tmp), metadata=meta)
    log.info("fisher: %s (N = %d items, T = %d draws, %d tensors)", out, n, t, len(names))


def load_fisher(path: str, checkpoint_fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Fisher tensors and metadata; refuses a Fisher computed from another checkpoint."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Fisher file not found: {path}; fix: run `musicattr fisher` first")
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    if checkpoint_fingerprint and "checkpoint_fingerprint" not in meta:
        raise FisherMismatchError(f"{path} records no checkpoint fingerprint, so nothing says it is the Fisher of "
                                  f"the checkpoint given now; fix: rerun `musicattr fisher` with this checkpoint")
    if checkpoint_fingerprint and meta["checkpoint_fingerprint"] != checkpoint_fingerprint:
        raise FisherMismatchError(
            f"{path} was computed from checkpoint {meta.get('checkpoint')} (fingerprint "
            f"{meta.get('checkpoint_fingerprint')}), not from the checkpoint given now ({checkpoint_fingerprint}); "
            "fix: rerun `musicattr fisher` with this checkpoint")
    return load_file(path), meta


class FisherModule(L.LightningModule):
    """One prediction pass of theta0 over the latent store: each batch's sums of squared per-sample gradients.

    Use with ``StorePredictDataModule`` and ``Trainer(inference_mode=False)``; the ``PartsWriter`` it
    configures sums, writes and merges (``<out>.parts/``, then ``<out>``)."""

    def __init__(self, checkpoint: str, out: str, task: AttributionTask | None = None, num_draws: int = 8,
                 seed: int = 0, target: str = "all", use_mask: bool = False, vectorize: bool = True,
                 chunk_size: int = 16, flush_every: int = 20, overwrite: bool = False):
        """Args: ``task`` the attribution task (default: the SAT DiT of ``musicattr fit``); ``num_draws`` T
        timesteps per item; ``target`` the layer group covered (``all`` covers every unlearning group);
        ``use_mask`` the loss over non-padded frames only; ``vectorize`` vmap(grad) (false: the per-sample
        loop); ``chunk_size`` per-sample gradients held at once; ``flush_every`` batches per part."""
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        attach_task(self, task, checkpoint, target)  # task, theta0, params, checkpoint_fp
        self.out = Path(out)
        self.parts = Parts(Path(f"{out}.parts"), TensorFormat("sum"), self.run_key, FisherMismatchError(
            f"{out}.parts holds partial sums of another Fisher run (other checkpoint, store, task, draws, seed, "
            "target or mask); fix: delete that folder, choose another output path, or pass --model.overwrite true"))

    def run_key(self) -> dict[str, Any]:
        """What the Fisher depends on (its parts' key and the final file's metadata)."""
        store = self.trainer.datamodule.store
        return {"checkpoint": self.hparams.checkpoint, "checkpoint_fingerprint": self.checkpoint_fp,
                "store": str(store.root), "store_fingerprint": store.fingerprint, **self.task.identity(),
                "num_draws": self.hparams.num_draws, "seed": self.hparams.seed, "target": self.hparams.target,
                "use_mask": self.hparams.use_mask}

    def configure_callbacks(self):
        return [PartsWriter(self.parts, self.merge, self.hparams.flush_every, self.hparams.overwrite)]

    def on_predict_start(self) -> None:
        # the PartsWriter takes each batch's sums as they come; the loop must not also keep them (at 1 B parameters
        # every batch's sums are 8 GB of float64)
        self.trainer.predict_loop.return_predictions = False

    def merge(self, parts: Parts) -> None:
        merge_fisher(parts, self.out, self.run_key(), list(self.params))

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        args = (self.task, self.theta0, self.params, batch, h.seed, range(h.num_draws))
        sq = (squared_grads_vmap(*args, mask=h.use_mask, chunk_size=h.chunk_size) if h.vectorize
              else squared_grads_loop(*args, mask=h.use_mask))
        return {"index": [int(i) for i in batch["index"]], **sq}
