"""Unlearning a query by the Fisher-preconditioned update (paper Eq. 2, Wang et al., 2024).

    theta <- theta + lr * (1/N) * (F + lambda)^-1 * grad_theta L(z_hat, theta; M_U)

applied ``steps`` times on the target parameters only, where L is the attribution task's per-item
loss averaged over K draws of (t, eps) of the query (keyed ``unlearn/<query id>``), F the diagonal
Fisher over N training items, and lambda = damping * mean(F over the target parameters) keeps
near-zero Fisher entries from blowing the step up. The update ascends the query's loss: the model
forgets z_hat.

The update is computed in float64 and cast back to the parameters' dtype: an element whose step is
below that dtype's resolution (|step| < ~eps |theta| / 2) does not move. ``run_unlearn`` counts the
elements that actually changed and warns when they are few.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musicattr.atomic import atomic_path
from musicattr.attribution.loss import UNLEARN
from musicattr.attribution.task import AttributionTask, load_task

log = logging.getLogger(__name__)
MIN_CHANGED_FRACTION = 0.5  # warn when fewer target elements than this moved


def loss_gradient(task: AttributionTask, params: Mapping[str, torch.nn.Parameter], batch, seed: int,
                  num_draws: int, *, namespace: str = "", mask: bool = False, draws_per_forward: int = 16,
                  cond=None) -> dict[str, torch.Tensor]:
    """grad_theta of the summed per-item loss L(z_b, theta; M) of ``batch`` over ``num_draws`` draws keyed
    ``namespace + id`` (float64, accumulated ``draws_per_forward`` draws at a time). For a one-item batch
    with ``namespace=UNLEARN`` and M = M_U this is the query gradient of Eq. 2."""
    names = list(params)
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    if cond is None:
        with torch.no_grad():
            cond = task.conditioning(batch)
    with torch.enable_grad():
        for start in range(0, num_draws, draws_per_forward):
            n = min(draws_per_forward, num_draws - start)
            loss = task.item_loss(batch, seed, n, namespace=namespace, mask=mask, draws_per_forward=n,
                                  draw_offset=start, cond=cond)
            grads = torch.autograd.grad(loss.sum() * (n / num_draws), [params[k] for k in names])
            for k, g in zip(names, grads):
                total[k] += g.double()
    return total


def damped_inverse(fisher: Mapping[str, torch.Tensor], names, damping: float) -> dict[str, torch.Tensor]:
    """(F + lambda)^-1 on the tensors ``names`` (float64), lambda = damping * mean(F) over those tensors."""
    names = list(names)
    missing = [k for k in names if k not in fisher]
    if missing:
        raise KeyError(f"the Fisher has no entry for {missing[:3]}...; fix: compute the Fisher with a target "
                       "group that covers the unlearning target (e.g. fisher target 'all')")
    total = sum(float(fisher[k].double().sum()) for k in names)
    count = sum(fisher[k].numel() for k in names)
    if total <= 0:
        raise ValueError("the Fisher is zero on every target tensor: these parameters do not affect the loss "
                         "(e.g. a cross-attention that ignores its context); fix: check the model config or "
                         "choose another target group")
    lam = damping * total / max(count, 1)
    return {k: 1.0 / (fisher[k].double() + lam) for k in names}


def eq2_update(theta: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor],
               fisher: Mapping[str, torch.Tensor], lr: float, num_items: int, damping: float) -> dict[str, torch.Tensor]:
    """theta + lr / N * grad / (F + lambda), lambda = damping * mean(F) over the given tensors (float64 math)."""
    inv = damped_inverse(fisher, grad, damping)
    return {k: (theta[k].double() + lr / num_items * grad[k] * inv[k].to(grad[k].device)).to(theta[k].dtype)
            for k in grad}


def unlearn_query(task: AttributionTask, batch, fisher: Mapping[str, torch.Tensor], num_items: int,
                  target: str = "all", lr: float = 1e-6, steps: int = 1, num_draws: int = 256, seed: int = 0,
                  mask: bool = True, damping: float = 1e-3, draws_per_forward: int = 16) -> dict[str, torch.Tensor]:
    """Apply Eq. 2 ``steps`` times in place on the target parameters of ``task.net`` for the one-item ``batch``
    (draws keyed ``unlearn/<id>``, ``mask`` M_U); return their new values (CPU).

    The caller keeps theta0 (e.g. reload the checkpoint) if it needs it afterwards.
    """
    params = task.select_parameters(target)
    with torch.no_grad():
        cond = task.conditioning(batch)
    for _ in range(steps):
        g = loss_gradient(task, params, batch, seed, num_draws, namespace=UNLEARN, mask=mask,
                          draws_per_forward=draws_per_forward, cond=cond)
        new = eq2_update({k: p.detach() for k, p in params.items()}, g, fisher, lr, num_items, damping)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(new[k])
    return {k: p.detach().clone().cpu() for k, p in params.items()}


def count_changed(theta0: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(elements of ``theta`` that differ from ``theta0``, elements in all) over the tensors of ``theta``."""
    changed = sum(int((theta[k] != theta0[k].to(theta[k].device)).sum()) for k in theta)
    return changed, sum(theta[k].numel() for k in theta)


def save_unlearned(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write only the changed tensors (their unlearned values) with the run's metadata."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_unlearned(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"unlearned weights not found: {path}; fix: run `musicattr unlearn` first")
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return load_file(path), meta


def query_batch(query: str | None = None, query_item: str | None = None, store: str | None = None) -> dict[str, Any]:
    """A batch of one: a generated query file, or a training item of the latent store (its item_id, or
    ``index:N`` / N for its index; see ``LatentStore.resolve``)."""
    if (query is None) == (query_item is None):
        raise ValueError("give exactly one of query (a .query.safetensors from `musicattr generate`) "
                         "or query_item (a training item id, with store)")
    if query is not None:
        from musicattr.models.generate import load_query

        q = load_query(query)
        item = {**q, "item_id": q["query_id"]}
    else:
        from musicattr.data.latent_store import LatentStore

        if store is None:
            raise ValueError("query_item needs store (the latent store holding the item)")
        s = LatentStore(store)
        item = s[s.resolve(query_item)]
    return {"latents": item["latents"][None].float(), "text_emb": item["text_emb"][None].float(),
            "seconds_start": torch.tensor([float(item["seconds_start"])]),
            "seconds_total": torch.tensor([float(item["seconds_total"])]),
            "valid_frames": torch.tensor([int(item["valid_frames"])]), "item_id": [str(item["item_id"])]}


# the metadata that identifies an unlearning run: same values, same unlearned weights (up to float order)
RUN_KEYS = ("query_id", "query_fingerprint", "checkpoint_fingerprint", "fisher_fingerprint", "task", "num_items",
            "lr", "steps", "num_draws", "target", "strategy", "mask_unlearn", "mask_loss", "damping", "seed")


def query_fingerprint(query: str | None, query_item: str | None, store: str | None) -> str:
    """Content fingerprint of the query: its file, or the store's fingerprint and the item's id."""
    from musicattr.data.latent_store import LatentStore
    from musicattr.models.sat import file_fingerprint

    if query is not None:
        return file_fingerprint(query)
    s = LatentStore(store)
    return f"{s.fingerprint}:{s.items['item_id'].iloc[s.resolve(query_item)]}"


def run_unlearn(checkpoint: str, fisher: str, out: str, query: str | None = None, query_item: str | None = None,
                store: str | None = None, lr: float = 1e-6, steps: int = 1, num_draws: int = 256,
                target: str = "all", strategy: str = "mixed", mask_unlearn: bool | None = None,
                damping: float = 1e-3, seed: int = 0, draws_per_forward: int = 16, device: str = "cpu",
                reuse: bool = False, task: AttributionTask | None = None) -> dict:
    """Unlearn one query from theta0 (Eq. 2) and write the changed tensors to ``out``.

    Args:
        checkpoint: theta0, from ``musicattr fit``.
        fisher: the diagonal Fisher from ``musicattr fisher`` (same checkpoint).
        out: output .safetensors file (only the changed tensors, with metadata).
        query / query_item: a generated query file, or a training item id or index (train-to-train).
        lr: learning rate of Eq. 2 (the paper: 1e-6 on 115k tracks); steps: number of updates (1-4).
        num_draws: K, query timesteps the gradient is averaged over (the paper: 2048).
        target: layer group 'all' | 'self' | 'cross' | 'to_kv', or a regex over parameter names.
        strategy: 'mixed' (M_U on, M_L off; the paper's choice), 'both' or 'none'; mask_unlearn overrides M_U.
        damping: lambda = damping * mean(F) added to the Fisher before inverting it.
        seed: draws of the query are keyed by (seed, 'unlearn/' + query id, j), distinct from scoring draws.
        reuse: keep an existing ``out`` whose metadata matches this run on every ``RUN_KEYS`` entry
            (fingerprints of checkpoint, Fisher and query included); otherwise it is recomputed.
        task: the attribution task (default: the SAT DiT of ``musicattr fit``).
    """
    from musicattr.attribution.fisher import load_fisher
    from musicattr.attribution.masks import resolve_masks
    from musicattr.models.sat import file_fingerprint

    ckpt_fp = file_fingerprint(checkpoint)
    fisher_t, fisher_meta = load_fisher(fisher, ckpt_fp)
    mu, ml = resolve_masks(strategy, mask_unlearn=mask_unlearn)
    batch = query_batch(query, query_item, store)
    qid = batch["item_id"][0]
    meta = {"query_id": qid, "query": query, "query_item": query_item,
            "query_fingerprint": query_fingerprint(query, query_item, store), "checkpoint": checkpoint,
            "checkpoint_fingerprint": ckpt_fp, "fisher": fisher, "fisher_fingerprint": file_fingerprint(fisher),
            "task": None, "num_items": int(fisher_meta["num_items"]), "lr": lr, "steps": steps,
            "num_draws": num_draws, "target": target, "strategy": strategy, "mask_unlearn": mu, "mask_loss": ml,
            "damping": damping, "seed": seed}
    if task is None:
        from musicattr.models.sat_task import SATDiffusionTask

        task = SATDiffusionTask()
    meta["task"] = task.identity()
    if reuse and os.path.exists(out):
        old = load_unlearned(out)[1]
        if all(old.get(k) == json.loads(json.dumps(meta[k])) for k in RUN_KEYS):
            log.info("unlearn: %s is up to date (same query, checkpoint, Fisher and settings): reused", out)
            return old
    load_task(task, checkpoint).model.to(device)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    theta0 = {k: p.detach().to("cpu", copy=True) for k, p in task.select_parameters(target).items()}
    new = unlearn_query(task, batch, {k: v.to(device) for k, v in fisher_t.items()}, int(fisher_meta["num_items"]),
                        target, lr, steps, num_draws, seed, mu, damping, draws_per_forward)
    changed, total = count_changed(theta0, new)
    meta.update(changed_elements=changed, target_elements=total)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_unlearned(out, new, meta)
    log.info("unlearn: %s -> %s (%d tensors; %d of %d elements changed)", qid, out, len(new), changed, total)
    if changed < MIN_CHANGED_FRACTION * total:
        log.warning("unlearn: only %d of %d target elements (%.1f%%) changed: the other updates are below the "
                    "resolution of %s and vanished when cast back; fix: raise lr or steps",
                    changed, total, 100.0 * changed / max(total, 1), next(iter(new.values())).dtype)
    return meta
