"""Unlearning a query by the Fisher-preconditioned update (paper Eq. 2, Wang et al., 2024).

    theta <- theta + lr * (1/N) * (F + lambda)^-1 * grad_theta L(z_hat, theta; M_U)

applied ``steps`` times on the target parameters only, where L is the attribution task's per-item
loss averaged over K draws of (t, eps) of the query (keyed ``unlearn/<query id>``), and
(F + lambda)^-1 the preconditioner (``attribution/preconditioner.py``; the paper's: the diagonal Fisher over N
training items, lambda = damping * mean(F over the target parameters) keeps near-zero Fisher entries from
blowing the step up). The update ascends the query's loss: the model forgets z_hat.

The update is computed in float64 and cast back to the parameters' dtype: an element whose step is
below that dtype's resolution (|step| < ~eps |theta| / 2) does not move. ``run_unlearn`` counts the
elements that actually changed and warns when they are few.

Precision. theta0 stays float32 and the step (gradient total, (F + lambda)^-1, lr / N, theta + step) is float64
in every case. ``precision="bf16-mixed"`` runs only the query's forward and backward passes under bfloat16
autocast (Lightning's ``MixedPrecision`` plugin, as ``--trainer.precision bf16-mixed`` does for the Lightning
stages); the gradient is float32 (theta0's dtype) and is summed in float64. That changes the step by bf16's
rounding: 1.2e-2 of its norm on the tests' tiny DiT at K = 4 (tests/test_bf16_path.py; allowed: 5e-2), to first
order a change of about that fraction of the scores' typical size, well below their draw noise on the demo
(median SE / |tau| about 0.7 on q000). The default is ``32-true``; the precision, when not ``32-true``, is
written to the unlearned file and is part of what ``reuse`` compares.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from musicattr.atomic import atomic_path
from musicattr.attribution.loss import UNLEARN
from musicattr.attribution.preconditioner import DiagonalFisher, Preconditioner
from musicattr.attribution.task import AttributionTask, load_theta, resolve_task
from musicattr.data.queries import query_batch, query_fingerprint
from musicattr.fingerprint import file_fingerprint

log = logging.getLogger(__name__)
MIN_CHANGED_FRACTION = 0.5  # warn when fewer target elements than this moved
UNLEARN_PRECISIONS = ("32-true", "bf16-mixed")  # Lightning's names


def precision_context(precision: str, device: torch.device | str = "cpu"):
    """The autocast of the query gradient: none for ``32-true``, Lightning's bf16 ``MixedPrecision`` plugin's
    for ``bf16-mixed`` (on ``device``'s type)."""
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision

        return MixedPrecision("bf16-mixed", torch.device(device).type).forward_context()
    raise ValueError(f"unlearn precision {precision!r}; fix: 32-true (the default) or bf16-mixed (the query's "
                     "forward and backward under bf16 autocast; the update stays float64)")


def loss_gradient(task: AttributionTask, model, params: Mapping[str, torch.nn.Parameter], batch, seed: int,
                  num_draws: int, *, namespace: str = "", mask: bool = False, draws_per_forward: int = 16,
                  cond=None, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """grad_theta of the summed per-item loss L(z_b, theta; M) of ``batch`` over ``num_draws`` draws keyed
    ``namespace + id`` (accumulated in ``dtype``, float64 by default, ``draws_per_forward`` draws at a time). For a
    one-item batch with ``namespace=UNLEARN`` and M = M_U this is the query gradient of Eq. 2.

    Each tensor's gradient is added to the total as soon as the backward pass has produced it and then freed
    (a hook per tensor), so memory holds the total plus one tensor's gradient, not a second copy of the model."""
    from musicattr.attribution.gradients import _tensor_hooks

    names = list(params)
    total = {k: torch.zeros_like(p, dtype=dtype) for k, p in params.items()}
    if cond is None:
        with torch.no_grad():
            cond = task.conditioning(model, batch)

    def take(name: str, g: torch.Tensor) -> None:
        total[name] += g.to(dtype)

    saved = {k: p.grad for k, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        with _tensor_hooks(params, take) as state, torch.enable_grad():
            state["armed"] = True
            for start in range(0, num_draws, draws_per_forward):
                n = min(draws_per_forward, num_draws - start)
                loss = task.item_loss(model, batch, seed, n, namespace=namespace, mask=mask, draws_per_forward=n,
                                      draw_offset=start, cond=cond)
                (loss.sum() * (n / num_draws)).backward(inputs=[params[k] for k in names])
    finally:
        for k, p in params.items():
            p.grad = saved[k]
    return total


def _per_tensor(precond: Preconditioner) -> bool:
    """Whether P applies tensor by tensor (``Preconditioner.apply`` not overridden, as the diagonal Fisher)."""
    return type(precond).apply is Preconditioner.apply


def eq2_update(theta: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor], precond: Preconditioner,
               lr: float, num_items: int) -> dict[str, torch.Tensor]:
    """theta + lr / N * P grad (float64 math, cast back to theta's dtype); P = (F + lambda)^-1 for the diagonal
    Fisher."""
    if _per_tensor(precond):  # the same numbers, one float64 step at a time
        return {k: (theta[k].double() + lr / num_items * precond.apply_tensor(k, grad[k], 1.0)).to(theta[k].dtype)
                for k in grad}
    step = precond.apply(grad)
    return {k: (theta[k].double() + lr / num_items * step[k]).to(theta[k].dtype) for k in grad}


def _grouped_updates(g: dict[str, torch.Tensor], params, precond: Preconditioner, lr: float, num_items: int):
    """(name, new value) of Eq. 2 over ``g``, one group of ``Preconditioner.coupled`` tensors at a time, each
    gradient popped as its group is updated (the diagonal Fisher: tensor by tensor; EK-FAC: a layer's weight and
    bias)."""
    for k in list(g):
        if k not in g:
            continue
        part = {n: g.pop(n) for n in precond.coupled(k) if n in g} or {k: g.pop(k)}
        yield from eq2_update({n: params[n].detach() for n in part}, part, precond, lr, num_items).items()
        del part


def unlearn_query(task: AttributionTask, model, batch, precond: Preconditioner, num_items: int,
                  target: str = "all", lr: float = 1e-6, steps: int = 1, num_draws: int = 256, seed: int = 0,
                  mask: bool = True, draws_per_forward: int = 16, on_update=None,
                  precision: str = "32-true") -> dict[str, torch.Tensor]:
    """Apply Eq. 2 ``steps`` times in place on the target parameters of ``model`` for the one-item ``batch``
    (draws keyed ``unlearn/<id>``, ``mask`` M_U); return their new values (CPU).

    Each group of tensors that P couples (one tensor for the diagonal Fisher, a layer's weight and bias for
    EK-FAC) is updated, and its float64 gradient freed, before the next group's step is formed. ``on_update(name, old, new)``, if given, sees each tensor's values before and after
    each step. The caller keeps theta0 (e.g. reload the checkpoint) if it needs it afterwards. ``precision``:
    the query gradient's (``precision_context``); the update is float64 either way.
    """
    params = task.select_parameters(model, target)
    with torch.no_grad():
        cond = task.conditioning(model, batch)
    device = next(iter(params.values())).device
    for _ in range(steps):
        with precision_context(precision, device):
            g = loss_gradient(task, model, params, batch, seed, num_draws, namespace=UNLEARN, mask=mask,
                              draws_per_forward=draws_per_forward, cond=cond)
        for k, new in _grouped_updates(g, params, precond, lr, num_items):
            with torch.no_grad():
                if on_update is not None:
                    on_update(k, params[k].detach(), new)
                params[k].copy_(new)
            del new
        del g
    # one copy on the host (a GPU clone first would hold a second copy of the target parameters on the device)
    return {k: p.detach().to("cpu", copy=True) for k, p in params.items()}


def count_changed(theta0: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(elements of ``theta`` that differ from ``theta0``, elements in all) over the tensors of ``theta``."""
    changed = sum(int((theta[k] != theta0[k].to(theta[k].device)).sum()) for k in theta)
    return changed, sum(theta[k].numel() for k in theta)


def save_unlearned(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write only the changed tensors (their unlearned values) with the run's metadata."""
    from musicattr.tensor_file import save_tensors

    with atomic_path(path) as tmp:   # streamed tensor by tensor (save_file copies the whole dict into memory first)
        save_tensors(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_unlearned(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"unlearned weights not found: {path}; fix: run `musicattr unlearn` first")
    from musicattr.tensor_file import load_tensors

    tensors, meta = load_tensors(path)   # plain reads: no pages of the file stay mapped beside the tensors
    return tensors, {k: json.loads(v) for k, v in (meta or {}).items()}


def unlearned_metadata(path: str) -> dict[str, Any]:
    """The metadata of an unlearned file (its run's settings and fingerprints), without reading its tensors."""
    from musicattr.tensor_file import read_metadata

    return {k: json.loads(v) for k, v in (read_metadata(path) or {}).items()}


# the metadata that identifies an unlearning run: same values, same unlearned weights (up to float order)
RUN_KEYS = ("query_id", "query_fingerprint", "checkpoint_fingerprint", "fisher_fingerprint", "task", "num_items",
            "lr", "steps", "num_draws", "target", "strategy", "mask_unlearn", "mask_loss", "damping", "seed")


def run_unlearn(checkpoint: str, fisher: str, out: str, query: str | None = None, query_item: str | None = None,
                store: str | None = None, lr: float = 1e-6, steps: int = 1, num_draws: int = 256,
                target: str = "all", strategy: str = "mixed", mask_unlearn: bool | None = None,
                damping: float = 1e-3, seed: int = 0, draws_per_forward: int = 16, device: str = "cpu",
                reuse: bool = False, task: AttributionTask | None = None, ekfac: str | None = None,
                precision: str = "32-true") -> dict:
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
        ekfac: a folder of EK-FAC factors (kronfluence's, fitted by ``musicattr peers``): P is then EK-FAC on the
            linear layers it covers and the diagonal Fisher on the other target tensors ("AbU+"); None (the default):
            the diagonal Fisher everywhere.
        precision: '32-true' (the default) or 'bf16-mixed': the query's forward and backward passes under bf16
            autocast (the update stays float64; see the module's docstring).
    """
    from musicattr.attribution.masks import resolve_masks

    precision_context(precision)  # refuses an unknown precision before any work
    ckpt_fp = file_fingerprint(checkpoint)
    mu, ml = resolve_masks(strategy, mask_unlearn=mask_unlearn)
    batch = query_batch(query, query_item, store)
    qid = batch["item_id"][0]
    task = resolve_task(task)
    fisher_fp = file_fingerprint(fisher)
    meta = {"query_id": qid, "query": query, "query_item": query_item,
            "query_fingerprint": query_fingerprint(query, query_item, store), "checkpoint": checkpoint,
            "checkpoint_fingerprint": ckpt_fp, "fisher": fisher, "fisher_fingerprint": fisher_fp,
            "task": task.identity(), "num_items": None, "lr": lr, "steps": steps,
            "num_draws": num_draws, "target": target, "strategy": strategy, "mask_unlearn": mu, "mask_loss": ml,
            "damping": damping, "seed": seed}
    if precision not in ("32-true", "32"):  # 32-true is not recorded: files written before keep matching
        meta["precision"] = precision
    if ekfac:
        from musicattr.attribution.ekfac import factors_fingerprint

        meta.update(preconditioner="ekfac", ekfac=ekfac, ekfac_fingerprint=factors_fingerprint(ekfac))
    if reuse and os.path.exists(out):
        old = unlearned_metadata(out)   # the header only: the tensors are 4 B per parameter
        same_p = all(old.get(k) == meta.get(k) for k in ("preconditioner", "ekfac_fingerprint", "precision"))
        if same_p and all(old.get(k) == json.loads(json.dumps(meta[k])) for k in RUN_KEYS if k != "num_items"):
            log.info("unlearn: %s is up to date (same query, checkpoint, Fisher and settings): reused", out)
            return old
    _, model = load_theta(task, checkpoint)
    model.to(device)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    params = task.select_parameters(model, target)
    precond = DiagonalFisher.load(fisher, params, damping, ckpt_fp).to(device)
    meta["num_items"] = precond.provenance()["num_items"]
    if ekfac:
        from musicattr.attribution.ekfac import EKFAC

        precond = EKFAC.load(ekfac, list(params), damping, fallback=precond, checkpoint_fingerprint=ckpt_fp,
                             lazy=True).to(device)  # one application per step: each layer's factors read when used
    count = {"changed": 0}
    if steps == 1:  # elements changed = elements the one step moved: counted as it is applied, no copy of theta0
        def seen(name, old, new_value):
            count["changed"] += int((new_value != old).sum())
        theta0 = None
    else:
        seen, theta0 = None, {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
    new = unlearn_query(task, model, batch, precond, meta["num_items"], target, lr, steps, num_draws, seed, mu,
                        draws_per_forward, on_update=seen, precision=precision)
    changed, total = (count["changed"], sum(v.numel() for v in new.values())) if theta0 is None \
        else count_changed(theta0, new)
    meta.update(changed_elements=changed, target_elements=total)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_unlearned(out, new, meta)
    log.info("unlearn: %s -> %s (%d tensors; %d of %d elements changed)", qid, out, len(new), changed, total)
    if changed < MIN_CHANGED_FRACTION * total:
        log.warning("unlearn: only %d of %d target elements (%.1f%%) changed: the other updates are below the "
                    "resolution of %s and vanished when cast back; fix: raise lr or steps",
                    changed, total, 100.0 * changed / max(total, 1), next(iter(new.values())).dtype)
    return meta
