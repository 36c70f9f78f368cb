"""Per-item preconditioned gradients, handed over tensor by tensor (the index, the sensitivity pass,
first-order checks).

    phi_i = (F + lambda)^-1/2 g_i,    g_i = grad_theta L(z_i, theta0; M)   over the target tensors

g_i is the gradient of item i's loss over its own draws (for scoring: the T bare-id draws of Eq. 1),
one backward pass per item with the item's draws as the batch. A hook on each target tensor takes its
gradient as soon as the backward pass has produced it, applies the preconditioner's square root
(``Preconditioner.apply_tensor``, power 1/2) and hands it to ``consume(item, name, phi)``, then frees
it: when the draws fit one forward (``draws_per_forward >= num_draws``) the item's gradient never
exists whole, only one tensor at a time. With fewer draws per forward, the draws' gradients
accumulate in the tensors' ``.grad`` (one item's gradient, as a training step holds it) and each
tensor is handed over after the last chunk. Tensors that P couples (``Preconditioner.coupled``: EK-FAC's
weight and bias of one layer) are held until the group's last one arrives and preconditioned together.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch

from musicattr.attribution.preconditioner import Preconditioner
from musicattr.attribution.task import AttributionTask
from musicattr.data.datamodules import item_slice

Consume = Callable[[int, str, torch.Tensor], None]


@contextlib.contextmanager
def _tensor_hooks(params: Mapping[str, torch.nn.Parameter], take: Callable[[str, torch.Tensor], None]
                  ) -> Iterator[dict]:
    """While armed (``state["armed"]``), hand each tensor's accumulated gradient to ``take`` and free it."""
    state = {"armed": False}

    def hook(name):
        def fire(p):
            if state["armed"]:
                take(name, p.grad)
                p.grad = None
        return fire

    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in params.items()]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.grad = None


def preconditioned_gradients(task: AttributionTask, model, params: Mapping[str, torch.nn.Parameter],
                             precond: Preconditioner, batch: Mapping[str, Any], seed: int,
                             num_draws: int, consume: Consume, *, namespace: str = "", mask: bool = False,
                             draws_per_forward: int = 16) -> torch.Tensor:
    """For each item j of ``batch``: consume(j, name, phi_j[name]) for every target tensor that the loss
    reaches (phi = P^1/2 g, float32, on the tensors' device); returns the items' per-draw losses L_t(z_j, theta; M),
    float64 [B, T] (their mean over draws is the item's loss). Draws keyed ``namespace + id``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("per-item gradients are needed, but this runs under torch.inference_mode; "
                           "fix: run the prediction loop with Trainer(inference_mode=False)")
    names = list(params)
    inputs = [params[k] for k in names]
    losses = []
    item = {"j": 0}
    groups = {k: tuple(n for n in precond.coupled(k) if n in params) or (k,) for k in names}
    pending: dict[str, torch.Tensor] = {}

    def flush(group) -> None:
        phi = precond.apply_sqrt({n: pending.pop(n) for n in group if n in pending})
        for n, v in phi.items():
            consume(item["j"], n, v)

    def take(name: str, g: torch.Tensor) -> None:
        if len(groups[name]) == 1:
            consume(item["j"], name, precond.apply_tensor(name, g, 0.5))
            return
        pending[name] = g
        if all(n in pending for n in groups[name]):
            flush(groups[name])

    with _tensor_hooks(params, take) as state, torch.enable_grad():
        for j in range(len(batch["item_id"])):
            item["j"] = j
            one = item_slice(batch, j)
            with torch.no_grad():
                cond = task.conditioning(model, one)
            per_draw = []
            for start in range(0, num_draws, draws_per_forward):
                n = min(draws_per_forward, num_draws - start)
                state["armed"] = start + n >= num_draws
                loss = task.draw_losses(model, one, seed, n, namespace=namespace, mask=mask, draws_per_forward=n,
                                        draw_offset=start, cond=cond)
                (loss.sum() / num_draws).backward(inputs=inputs)
                per_draw.append(loss.detach().cpu()[0])
            if pending:  # a coupled tensor the loss did not reach: its group with a zero gradient there
                flush(list(pending))
            losses.append(torch.cat(per_draw))
    return torch.stack(losses)
