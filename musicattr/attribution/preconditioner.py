"""The preconditioner P ~ (F + lambda)^-1 that unlearning (Eq. 2), the sensitivity pass, scoring's relative
score and the index share. One interface, fitted once per model and saved with its provenance:

    apply(g)       = P g            (Eq. 2:  theta <- theta + lr/N P grad L(z_hat))
    apply_sqrt(g)  = P^1/2 g        (phi_i = P^1/2 g_i of the index and of s_i = ||phi_i||)
    apply_root(v)  = P^-1/2 v       (psi = P^-1/2 (theta_u - theta0) of an unlearned file)

applied tensor by tensor (``apply_tensor``), so per-item gradients never need to exist whole.
``DiagonalFisher`` is the first implementation: P = (F + lambda)^-1 elementwise, lambda = damping * mean(F)
over the tensors it covers, F from ``musicattr fisher`` (the fit).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch


class Preconditioner(ABC):
    """P over a set of named tensors."""

    names: list[str]

    @abstractmethod
    def apply_tensor(self, name: str, g: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """P^power g for the tensor ``name`` (power 1: P g; 0.5: P^1/2 g; -0.5: P^-1/2 g); float64."""

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """What the preconditioner was fitted from and with (fingerprints, damping): part of every key."""

    def to(self, device: torch.device | str) -> "Preconditioner":
        return self

    def coupled(self, name: str) -> tuple[str, ...]:
        """The tensors P acts on together with ``name`` (P is block diagonal over such groups); default: itself."""
        return (name,)

    def apply(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.apply_tensor(k, g, 1.0) for k, g in grads.items()}

    def apply_sqrt(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.apply_tensor(k, g, 0.5) for k, g in grads.items()}

    def apply_root(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.apply_tensor(k, v, -0.5) for k, v in values.items()}


def damping_lambda(fisher: Mapping[str, torch.Tensor], names, damping: float) -> float:
    """lambda = damping * mean(F) over the tensors ``names`` (the sum in float64); refuses missing or all-zero F."""
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
    return damping * total / max(count, 1)


def damped_inverse(fisher: Mapping[str, torch.Tensor], names, damping: float) -> dict[str, torch.Tensor]:
    """(F + lambda)^-1 on the tensors ``names`` (float64), lambda = damping * mean(F) over those tensors."""
    lam = damping_lambda(fisher, names, damping)
    return {k: 1.0 / (fisher[k].double() + lam) for k in names}


class _PerTensor(Mapping):
    """A read-only mapping name -> fn(name), computed at each access and never held (memory: one tensor)."""

    def __init__(self, names, fn):
        self._names, self._fn = list(names), fn

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._fn(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class DiagonalFisher(Preconditioner):
    """P = (F + lambda)^-1, elementwise; lambda = damping * mean(F) over ``names``.

    Only F is held, as stored (float32 from ``musicattr fisher``: 4 bytes per parameter); the inverse
    1 / (F + lambda) (float64, ``inverse``) and, for float32 gradients (phi_i, s_i), its square root in
    ``root_dtype`` (float32 by default, ``root``) are computed tensor by tensor when applied, with the same float64
    math as holding them (at 1 B parameters that would be 8 + 4 GB). Float64 inputs (Eq. 2, psi) get float64
    math throughout."""

    def __init__(self, fisher: Mapping[str, torch.Tensor], names, damping: float,
                 provenance: Mapping[str, Any] | None = None, root_dtype: torch.dtype = torch.float32):
        self.names = list(names)
        self.damping = float(damping)
        self.lam = damping_lambda(fisher, self.names, self.damping)
        self.fisher = {k: fisher[k] for k in self.names}
        self.inverse = _PerTensor(self.names, lambda k: 1.0 / (self.fisher[k].double() + self.lam))
        self.root = _PerTensor(self.names, lambda k: self.inverse[k].sqrt().to(root_dtype))
        self._provenance = {"preconditioner": "diagonal-fisher", **dict(provenance or {}), "damping": self.damping}

    @classmethod
    def load(cls, path: str, names, damping: float, checkpoint_fingerprint: str | None = None, **kw
             ) -> "DiagonalFisher":
        """From a Fisher file of ``musicattr fisher`` (refused when made from another checkpoint)."""
        from musicattr.attribution.fisher import load_fisher
        from musicattr.fingerprint import file_fingerprint

        tensors, meta = load_fisher(path, checkpoint_fingerprint)
        prov = {"fisher": path, "fisher_fingerprint": file_fingerprint(path), "num_items": int(meta["num_items"])}
        return cls(tensors, names, damping, prov, **kw)

    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def to(self, device: torch.device | str) -> "DiagonalFisher":
        self.fisher = {k: v.to(device) for k, v in self.fisher.items()}
        return self

    def apply_tensor(self, name: str, g: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        if power == 0.5 and g.dtype != torch.float64:
            return g * self.root[name].to(g.device, g.dtype)
        inv = self.inverse[name].to(g.device)
        if power == 1.0:
            return g.double() * inv
        if power == 0.5:
            return g * inv.sqrt()
        if power == -0.5:
            return g.double() / inv.sqrt()
        return g.double() * inv.pow(power)
