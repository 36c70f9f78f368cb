"""Diagonal Fisher information as a Lightning callback (paper Section 2.2).

    F_jj = 1/N sum_i 1/T sum_t ( dL_t(z_i, theta) / dtheta_j )^2

with L_t the single-draw loss of the shared contract (attribution/loss.py): per-item,
per-timestep squared gradients, never the square of a batch-mean gradient. The draws of item i
are keyed ``fisher/<id>``: the Fisher never reuses the scoring draws of the same item. Per-sample
gradients come from torch.func (vmap over grad) or, as the reference, a loop.

The callback runs inside a prediction pass over the latent store (``musicattr fisher``).
Each rank writes partial sums over disjoint item sets to ``<out>.parts/`` every
``flush_every`` batches; a killed run resumes by skipping the items already summed.
Rank 0 adds the parts up (float64, sorted order) and writes ``<out>`` with safetensors,
with metadata naming the checkpoint, N, T, seed, mask and target parameters.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.func import functional_call, grad, vmap

from musicattr.attribution.loss import FISHER, draw_keys, make_draws, masked_mse, repeat_conditioning, v_objective
from musicattr.attribution.targets import select_parameters
from musicattr.run_dir import claim_run_dir


class FisherMismatchError(RuntimeError):
    pass


def _pairs(z, cond, item_ids, seed, draws, frame_mask):
    """Flatten items x draws into single-draw examples (x_t, t, v_target, cond, mask)."""
    b, d = len(item_ids), len(draws)
    t, eps = make_draws(seed, item_ids, draws, tuple(z.shape[1:]))
    t = t.reshape(-1).to(z)
    x_t, target = v_objective(z.repeat_interleave(d, 0), t, eps.reshape(b * d, *z.shape[1:]).to(z))
    c = {k: v for k, v in repeat_conditioning(cond, d).items() if v is not None}
    m = frame_mask.repeat_interleave(d, 0) if frame_mask is not None else None
    return x_t, t, target, c, m


def squared_grads_vmap(net, params: Mapping[str, torch.Tensor], z, cond, item_ids, seed, draws,
                       frame_mask=None, chunk_size: int | None = 16) -> dict[str, torch.Tensor]:
    """sum over items and draws of (dL_t(z_i)/dtheta)^2, per-sample gradients by vmap(grad).

    Examples are processed ``chunk_size`` at a time and squared-summed at once, so memory holds at most
    ``chunk_size`` per-sample gradients."""
    x_t, t, target, c, m = _pairs(z, cond, item_ids, seed, draws, frame_mask)
    detached = {k: v.detach() for k, v in params.items()}

    def single(p, x1, t1, y1, c1, m1):
        kw = {k: v[None] for k, v in c1.items()}
        pred = functional_call(net, p, (x1[None], t1[None]), {**kw, "use_checkpointing": False})
        return masked_mse(pred, y1[None], None if m1 is None else m1[None])[0]

    per_sample = vmap(grad(single), in_dims=(None, 0, 0, 0, 0, None if m is None else 0))
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in detached.items()}
    step = chunk_size or x_t.shape[0]
    for a in range(0, x_t.shape[0], step):
        sl = slice(a, a + step)
        g = per_sample(detached, x_t[sl], t[sl], target[sl], {k: v[sl] for k, v in c.items()},
                       None if m is None else m[sl])
        for k, v in g.items():
            out[k] += v.double().pow(2).sum(0)
    return out


def squared_grads_loop(net, params: Mapping[str, torch.Tensor], z, cond, item_ids, seed, draws,
                       frame_mask=None) -> dict[str, torch.Tensor]:
    """Reference: the same sum with one backward pass per (item, draw)."""
    x_t, t, target, c, m = _pairs(z, cond, item_ids, seed, draws, frame_mask)
    names = list(params)
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for n in range(x_t.shape[0]):
        with torch.enable_grad():
            pred = net(x_t[n:n + 1], t[n:n + 1], **{k: v[n:n + 1] for k, v in c.items()}, use_checkpointing=False)
            loss = masked_mse(pred, target[n:n + 1], None if m is None else m[n:n + 1])[0]
            grads = torch.autograd.grad(loss, [params[k] for k in names])
        for k, gk in zip(names, grads):
            out[k] += gk.double().pow(2)
    return out


class FisherCallback(L.Callback):
    """Accumulates the diagonal Fisher of ``pl_module.net`` over a prediction pass.

    The LightningModule must provide ``net``, ``conditioning_inputs(batch)`` and ``frame_mask(batch)``
    (see models/diffusion_module.py); run the Trainer with ``inference_mode=False``.
    """

    def __init__(self, out: str, num_draws: int = 8, seed: int = 0, target: str = "all",
                 use_mask: bool = False, vectorize: bool = True, chunk_size: int = 16, flush_every: int = 20,
                 metadata: dict[str, Any] | None = None, overwrite: bool = False):
        self.out = Path(out)
        self.parts = Path(str(out) + ".parts")
        self.num_draws, self.seed, self.target = num_draws, seed, target
        self.use_mask, self.vectorize, self.chunk_size, self.flush_every = use_mask, vectorize, chunk_size, flush_every
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self._sum: dict[str, torch.Tensor] = {}
        self._indices: list[int] = []
        self._batches = 0

    def run_key(self) -> dict[str, Any]:
        return {**self.metadata, "num_draws": self.num_draws, "seed": self.seed, "target": self.target,
                "use_mask": self.use_mask}

    def check_parts(self) -> None:
        """Refuse (or, with overwrite, clear) partial sums left by a different Fisher run."""
        claim_run_dir(self.parts, self.parts / "run.json", self.run_key(), self.overwrite, "part-*.safetensors",
                      FisherMismatchError(f"{self.parts} holds partial sums of another Fisher run (other "
                                          "checkpoint, draws, seed, target or mask); fix: delete that folder, "
                                          "choose another output path, or pass --model.overwrite true"))

    def done_indices(self) -> set[int]:
        """Items already summed in earlier (interrupted) runs of the same Fisher run."""
        done = set()
        for p in sorted(self.parts.glob("part-*.safetensors")):
            with safe_open(str(p), "pt") as f:
                done.update(json.loads(f.metadata()["indices"]))
        return done

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.params = select_parameters(pl_module.net, self.target)
        if trainer.is_global_zero:
            self.check_parts()
        trainer.strategy.barrier()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        cond = pl_module.conditioning_inputs(batch)
        mask = pl_module.frame_mask(batch) if self.use_mask else None
        args = (pl_module.net, self.params, batch["latents"], cond, draw_keys(FISHER, batch["item_id"]), self.seed,
                range(self.num_draws), mask)
        sq = squared_grads_vmap(*args, chunk_size=self.chunk_size) if self.vectorize else squared_grads_loop(*args)
        for k, v in sq.items():
            self._sum[k] = self._sum[k] + v if k in self._sum else v
        self._indices += [int(i) for i in batch["index"]]
        self._batches += 1
        if self._batches % self.flush_every == 0:
            self._flush(trainer.global_rank)

    def _flush(self, rank: int) -> None:
        if not self._indices:
            return
        name = self.parts / f"part-r{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = name.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self._sum.items()}, str(tmp),
                  metadata={"indices": json.dumps(self._indices)})
        os.replace(tmp, name)
        self._sum, self._indices = {}, []

    def merge(self) -> None:
        """Write the final Fisher from all parts (rank 0)."""
        merge_fisher_parts(self.parts, self.out, self.run_key(), list(self.params))

    def on_predict_end(self, trainer, pl_module) -> None:
        self._flush(trainer.global_rank)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.merge()
        trainer.strategy.barrier()


def merge_fisher_parts(parts: Path, out: Path, key: dict[str, Any], names: list[str]) -> None:
    """F = (sum of part sums) / (N T), each item counted once; writes ``out`` (safetensors)."""
    total: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for p in sorted(parts.glob("part-*.safetensors")):
        with safe_open(str(p), "pt") as f:
            idx = json.loads(f.metadata()["indices"])
        if seen.intersection(idx):
            raise RuntimeError(f"{p} repeats items already summed; fix: delete {parts} and rerun")
        seen.update(idx)
        for k, v in load_file(str(p)).items():
            total[k] = total[k] + v if k in total else v
    n, t = len(seen), int(key["num_draws"])
    fisher = {k: (total[k] / (n * t)).float() for k in names}
    meta = {k: json.dumps(v) for k, v in {**key, "num_items": n, "parameters": names}.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(fisher, str(tmp), metadata=meta)
    os.replace(tmp, out)


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


class FisherPassModule(L.LightningModule):
    """One prediction pass of theta0 over the latent store, with the FisherCallback attached."""

    def __init__(self, checkpoint: str, store: str, out: str, num_draws: int = 8, seed: int = 0,
                 target: str = "all", use_mask: bool = False, vectorize: bool = True, chunk_size: int = 16,
                 batch_size: int = 8, num_workers: int = 0, flush_every: int = 20, overwrite: bool = False):
        super().__init__()
        from musicattr.data.latent_store import LatentStore
        from musicattr.models.diffusion_module import load_diffusion_module
        from musicattr.models.sat import file_fingerprint

        self.save_hyperparameters()
        self.theta0 = load_diffusion_module(checkpoint)
        self.store = LatentStore(store)
        self.callback = FisherCallback(out, num_draws, seed, target, use_mask, vectorize, chunk_size, flush_every,
                                       overwrite=overwrite, metadata={"checkpoint": checkpoint,
                                                 "checkpoint_fingerprint": file_fingerprint(checkpoint),
                                                 "store": str(store)})

    @property
    def net(self):
        return self.theta0.net

    def conditioning_inputs(self, batch):
        return self.theta0.conditioning_inputs(batch)

    def frame_mask(self, batch):
        return self.theta0.frame_mask(batch)

    def configure_callbacks(self):
        return [self.callback]

    def predict_dataloader(self):
        from torch.utils.data import Subset

        from musicattr.data.datamodules import predict_loader

        done = self.callback.done_indices()
        todo = [p for p, i in enumerate(self.store.items["index"]) if int(i) not in done]
        if not todo and self.trainer.is_global_zero:  # every item summed earlier: the loop will not run
            self.callback.merge()
        return predict_loader(Subset(self.store, todo), self.hparams.batch_size, self.hparams.num_workers,
                              self.trainer)

    def predict_step(self, batch, batch_idx):
        return None  # the work happens in FisherCallback.on_predict_batch_end
