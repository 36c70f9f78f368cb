"""The attribution task: the model-specific half of the loss contract (cf. kronfluence's ``Task`` and
TRAK's model-output functions).

The Fisher, unlearning, scoring and the sensitivity pass touch the model only through one stateless
``AttributionTask``, chosen by ``class_path`` in the configs (``--model.task`` / ``task:``); the model theta is
an argument of every call, never an attribute. A task says

    load(checkpoint)                theta: the model (a torch module)
    net(model)                      the module whose named parameters are attributed (Fisher, unlearned tensors)
    parameter_groups                target layer groups: name -> regex over ``net``'s parameter names
    conditioning(model, batch)      the model's conditioning inputs for a batch of the latent store
    frame_mask(model, batch)        [B, L] true on the non-padded latent frames (the masks M_U, M_L)
    noise(z, t, eps)                the forward process and the regression target: (z_t, target)
    predict(model, z_t, t, cond)    the network's output (optionally with ``params`` swapped in, for torch.func)
    timesteps                       how t is drawn from each draw's uniform (``loss.UniformTimesteps`` by default)

and the base class builds the loss of the contract from them:

    draw_loss:  L_t(z) = || M * (predict(z_t, t, c) - target) ||^2 / |M|      one (t, eps) draw
    item_loss:  L(z, theta; M) = 1/T sum_{j<T} L_{t_j}(z)                       float64, differentiable

with draw j of item ``id`` a pure function of (seed, namespace + id, j) (``draws``), eps of the latent's shape.
``resolve_task`` turns a config's task (an instance, a class path, or nothing: ``DEFAULT_TASK``) into a task.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch

from musicattr.attribution.layer_groups import select_parameters
from musicattr.attribution.loss import UNIFORM, draw_keys, make_draws, masked_mse, repeat_conditioning, timesteps_from

# The one place the default is named (a class path, not an import: the attribution core imports no model code).
DEFAULT_TASK = "musicattr.models.sat_task.SATDiffusionTask"


class AttributionTask(ABC):
    """What attribution needs from a diffusion model. Subclasses implement the abstract members."""

    parameter_groups: Mapping[str, str] = {}
    timesteps = UNIFORM
    shared_draws = False

    def __init__(self, timesteps: str | None = None, shared_draws: bool | None = None):
        """``timesteps``: the draw design of t, 'uniform', 'stratified-S' or 'discrete-N' (None: the task's own).
        ``shared_draws``: every item takes the same draws (t_j, eps_j) of a purpose (common random numbers), so
        the noise that the items' scores share does not move their ranking (None: the task's own, per item)."""
        if timesteps is not None:
            self.timesteps = timesteps_from(timesteps)
        if shared_draws is not None:
            self.shared_draws = bool(shared_draws)

    # ---------------------------------------------------------------- the model
    @abstractmethod
    def load(self, checkpoint: str) -> torch.nn.Module:
        """theta read from ``checkpoint`` (eval mode, CPU)."""

    @abstractmethod
    def net(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network of ``model`` whose named parameters the Fisher covers and unlearning changes."""

    def identity(self) -> dict[str, Any]:
        """What distinguishes this task's losses from another's (part of every cache and run key)."""
        return {"task": f"{type(self).__module__}.{type(self).__qualname__}", **self.timesteps.identity(),
                **({"draws": "shared"} if self.shared_draws else {})}

    # ---------------------------------------------------------------- the data
    @abstractmethod
    def conditioning(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Conditioning inputs of ``predict`` for a batch (tensors batched along dim 0, or None)."""

    @abstractmethod
    def frame_mask(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, L] boolean: the latent frames that are not padding."""

    # ---------------------------------------------------------------- the objective
    @abstractmethod
    def noise(self, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noised input z_t and regression target for z [N, ...], t [N] in (0, 1), eps like z."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The network's output at (z_t, t, cond); ``params`` replace ``net``'s parameters of those names
        (``torch.func.functional_call``), as per-sample gradients need."""

    # ---------------------------------------------------------------- built from the above
    def draw_keys(self, namespace: str, item_ids) -> list[str]:
        """The keys of the items' draws for one purpose: ``namespace + item_id``, or with ``shared_draws`` one key
        ``namespace + '*'`` for every item (draw j is then the same (t_j, eps_j) for all of them)."""
        return draw_keys(namespace, ["*"] * len(item_ids) if self.shared_draws else item_ids)

    def draws(self, seed: int, keys, draws, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, D] and eps [B, D, *shape] of draws ``draws`` of ``keys`` (this task's timestep sampler)."""
        return make_draws(seed, keys, draws, shape, self.timesteps)

    def select_parameters(self, model: torch.nn.Module, target: str) -> dict[str, torch.nn.Parameter]:
        """The parameters of a target layer group (a name of ``parameter_groups``, or a regex)."""
        return select_parameters(self.net(model), target, self.parameter_groups)

    def draw_loss(self, model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                  cond: Mapping[str, Any], mask: torch.Tensor | None = None,
                  params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """L_t for each row: z [N, ..., L], t [N], eps like z, cond batched N, mask [N, L] or None -> [N]."""
        z_t, target = self.noise(z, t, eps)
        return masked_mse(self.predict(model, z_t, t, cond, params), target, mask)

    def draw_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], seed: int, num_draws: int, *,
                    namespace: str = "", mask: bool = False, draws_per_forward: int = 16, draw_offset: int = 0,
                    cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        """L_{t_j}(z_b) of each item and draw ``draw_offset .. + num_draws`` keyed ``namespace + item_id``: float64
        [B, T], differentiable. ``mask``: over the non-padded frames only. Draws are processed
        ``draws_per_forward`` at a time to bound memory; ``cond`` reuses conditioning computed once by the caller."""
        z = batch["latents"]
        b = z.shape[0]
        keys = self.draw_keys(namespace, batch["item_id"])
        cond = self.conditioning(model, batch) if cond is None else cond
        m = self.frame_mask(model, batch) if mask else None
        chunks = []
        for start in range(0, num_draws, draws_per_forward):
            idx = range(draw_offset + start, draw_offset + min(num_draws, start + draws_per_forward))
            t, eps = self.draws(seed, keys, idx, tuple(z.shape[1:]))
            d = len(idx)
            losses = self.draw_loss(model, z.repeat_interleave(d, 0), t.reshape(-1).to(z),
                                    eps.reshape(b * d, *z.shape[1:]).to(z), repeat_conditioning(cond, d),
                                    None if m is None else m.repeat_interleave(d, 0))
            chunks.append(losses.view(b, d).double())
        return torch.cat(chunks, 1)

    def item_loss(self, model: torch.nn.Module, batch: Mapping[str, Any], seed: int, num_draws: int, *,
                  namespace: str = "", mask: bool = False, draws_per_forward: int = 16, draw_offset: int = 0,
                  cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        """L(z_b, theta; M) = the mean of ``draw_losses`` over the draws: float64 [B], differentiable (wrap in
        torch.no_grad() to score)."""
        return self.draw_losses(model, batch, seed, num_draws, namespace=namespace, mask=mask,
                                draws_per_forward=draws_per_forward, draw_offset=draw_offset, cond=cond).mean(1)


def resolve_task(task: AttributionTask | str | None = None) -> AttributionTask:
    """A task instance from a config's value: an instance (as is), a class path, or None (``DEFAULT_TASK``)."""
    if isinstance(task, AttributionTask):
        return task
    path = task or DEFAULT_TASK
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"attribution task {path!r} cannot be imported ({e}); fix: name an AttributionTask "
                         "subclass by its class path, e.g. musicattr.models.sat_task.SATDiffusionTask") from e
    if not (isinstance(cls, type) and issubclass(cls, AttributionTask)):
        raise ValueError(f"{path!r} is not an AttributionTask subclass; fix: name one by its class path")
    return cls()


def load_theta(task: AttributionTask | str | None, checkpoint: str) -> tuple[AttributionTask, torch.nn.Module]:
    """(the resolved task, theta loaded from ``checkpoint``)."""
    task = resolve_task(task)
    return task, task.load(checkpoint)


def attach_task(module: torch.nn.Module, task: AttributionTask | str | None, checkpoint: str, target: str) -> None:
    """Give a prediction pass's LightningModule its theta0: ``module.task`` (stateless), ``module.theta0``
    (the model, registered so Lightning moves it to the device), ``module.params`` (the tensors of ``target``)
    and ``module.checkpoint_fp`` (the checkpoint's fingerprint)."""
    from musicattr.fingerprint import file_fingerprint

    module.task, module.theta0 = load_theta(task, checkpoint)
    module.params = module.task.select_parameters(module.theta0, target)
    module.checkpoint_fp = file_fingerprint(checkpoint)
