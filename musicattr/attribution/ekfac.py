"""EK-FAC as a preconditioner of Eq. 2 (``Preconditioner``): P = (G + lambda)^-1 with G the eigenvalue-corrected
Kronecker-factored curvature of each linear layer (George et al., 2018; Grosse et al., 2023), read from the factors
that kronfluence fits (its saved format: one safetensors file per factor, keyed by module name).

For a linear layer with weight W [out, in] (and bias b [out]) the gradient is the matrix V = [dW | db] [out, in(+1)]
(kronfluence appends a constant 1 to the input for the bias). With Q_A, Q_S the eigenvectors of the activation and
pre-activation-gradient covariances and Lambda [out, in(+1)] the corrected eigenvalues (the mean of squared
per-example gradients in that basis: ``lambda_matrix / num_lambda_processed``),

    P^p V = Q_S [ (Q_S^T V Q_A) * (Lambda + lambda)^-p ] Q_A^T          p = 1 (Eq. 2), 1/2, -1/2

lambda = damping * mean(Lambda) over every covered layer (``scope: global``): the diagonal Fisher's rule (mean(Lambda) of
a layer is the mean of its diagonal Fisher when Lambda comes from the same per-example gradients); ``scope: layer``
takes the mean per layer, kronfluence's heuristic (damping 0.1). Tensors that no linear layer
covers (norm gains, modulation tables) go to ``fallback`` (e.g. the diagonal Fisher). Weight and bias of one layer
are coupled, so ``apply`` handles them together; ``apply_tensor`` on one of them alone works for bias-free layers.

Needs only torch and safetensors (kronfluence writes the files; ``musicattr ekfac`` / ``musicattr peers`` fit them
and write ``musicattr_ekfac.json`` beside them: module name -> its weight and bias parameter names).

Memory: the factors are about as large as the model in Lambda plus in^2 + out^2 per layer in Q_A, Q_S (1.1 GB per
block of the paper's DiT in kronfluence's float32 files, twice that held here in float64: 26 and 53 GB at depth 24);
``load(lazy=True)`` holds none of them and reads a layer's factors from the files when that layer is applied (the
same float64 numbers; the largest layer of the paper's DiT, Q_S of 12288 x 12288, is 1.2 GB): for a single
application per query (Eq. 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from musicattr.attribution.preconditioner import Preconditioner

MAPPING_FILE = "musicattr_ekfac.json"
FACTOR_FILES = ("activation_eigenvectors", "gradient_eigenvectors", "lambda_matrix", "num_lambda_processed")


def factors_fingerprint(factors_dir: str | Path) -> str:
    """The fingerprint an unlearned file records of the EK-FAC factors it was made with (of their Lambda file)."""
    from musicattr.fingerprint import file_fingerprint

    return file_fingerprint(str(Path(factors_dir) / "lambda_matrix.safetensors"))


class EKFAC(Preconditioner):
    """P = (G_EKFAC + lambda)^-1 per linear layer; ``layers``: module -> {"weight": name, "bias": name or None,
    "qa": [in(+1), in(+1)], "qs": [out, out], "lam": [out, in(+1)]} (float64)."""

    def __init__(self, layers: Mapping[str, Mapping[str, Any]], damping: float = 1e-3,
                 fallback: Preconditioner | None = None, provenance: Mapping[str, Any] | None = None,
                 scope: str = "global", source: Path | None = None):
        self._source, self._device = source, None
        if source is None:
            self.layers = {m: {"weight": d["weight"], "bias": d.get("bias"), "qa": d["qa"].double(),
                               "qs": d["qs"].double(), "lam": d["lam"].double()} for m, d in layers.items()}
        else:  # lazy: per layer only its names, the mean and size of Lambda (streamed once for the damping)
            self.layers = {m: {"weight": d["weight"], "bias": d.get("bias")} for m, d in layers.items()}
        sums = {}
        for m in self.layers:
            lam = self._factors(m, ("lam",))[0]
            sums[m] = (float(lam.sum()), lam.numel())
            del lam
        total = sum(t for t, _ in sums.values())
        count = sum(n for _, n in sums.values())
        if total <= 0:
            raise ValueError("the EK-FAC eigenvalues are zero on every layer; fix: refit the factors on data that "
                             "reaches these layers")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope = {scope!r}; fix: 'global' (damping x the mean over all layers) or 'layer'")
        self.damping, self.scope = float(damping), scope
        self.lam = self.damping * total / max(count, 1)
        for m, d in self.layers.items():
            d["damp"] = self.lam if scope == "global" else self.damping * sums[m][0] / max(sums[m][1], 1)
        self.owner = {}
        for m, d in self.layers.items():
            self.owner[d["weight"]] = m
            if d["bias"] is not None:
                self.owner[d["bias"]] = m
        self.fallback = fallback
        self.names = list(self.owner) + [n for n in (fallback.names if fallback else []) if n not in self.owner]
        self._provenance = {"preconditioner": "ekfac", **dict(provenance or {}), "damping": self.damping,
                            "scope": scope, "lambda": self.lam, "layers": len(self.layers),
                            **({"lazy": True} if source is not None else {}),
                            **({"fallback": fallback.provenance()} if fallback else {})}

    # ------------------------------------------------------------------ load kronfluence's factors
    @classmethod
    def load(cls, factors_dir: str | Path, names=None, damping: float = 1e-3, fallback: Preconditioner | None = None,
             checkpoint_fingerprint: str | None = None, scope: str = "global", lazy: bool = False) -> "EKFAC":
        """From kronfluence's EK-FAC factors in ``factors_dir`` and the ``musicattr_ekfac.json`` beside them; only
        the layers with a parameter in ``names`` (all if None). Refused when fitted on another checkpoint.
        ``lazy``: hold no factor, read each layer's from the files when it is applied (the same numbers)."""
        from safetensors.torch import load_file

        d = Path(factors_dir)
        mapping_path = d / MAPPING_FILE
        missing = [f"{f}.safetensors" for f in FACTOR_FILES if not (d / f"{f}.safetensors").exists()]
        if missing or not mapping_path.exists():
            raise FileNotFoundError(f"{d} holds no fitted EK-FAC factors ({missing or [MAPPING_FILE]} missing); fix: "
                                    "run `musicattr ekfac` (make demo runs it) or `musicattr peers` with the ekfac "
                                    "peer, or pass --ekfac null for the diagonal Fisher")
        meta = json.loads(mapping_path.read_text())
        if checkpoint_fingerprint and meta.get("checkpoint_fingerprint") not in (None, checkpoint_fingerprint):
            raise ValueError(f"{d}: EK-FAC factors of another checkpoint ({meta.get('checkpoint_fingerprint')} vs "
                             f"{checkpoint_fingerprint}); fix: refit them for this checkpoint (`musicattr ekfac`)")
        wanted = None if names is None else set(names)
        modules = {m: p for m, p in meta["modules"].items()
                   if wanted is None or p["weight"] in wanted or p.get("bias") in wanted}
        prov = {"factors": str(d), **{k: meta[k] for k in ("checkpoint_fingerprint", "store_fingerprint", "fit")
                                      if k in meta}}
        if lazy:
            return cls({m: {"weight": p["weight"], "bias": p.get("bias")} for m, p in modules.items()}, damping,
                       fallback, prov, scope, source=d)
        f = {k: load_file(str(d / f"{k}.safetensors")) for k in FACTOR_FILES}
        layers = {m: {"weight": p["weight"], "bias": p.get("bias"), "qa": f["activation_eigenvectors"][m],
                      "qs": f["gradient_eigenvectors"][m],
                      "lam": f["lambda_matrix"][m].double() / f["num_lambda_processed"][m].double()}
                  for m, p in modules.items()}
        return cls(layers, damping, fallback, prov, scope)

    def _factors(self, module: str, keys=("qa", "qs", "lam")) -> list[torch.Tensor]:
        """Q_A, Q_S, Lambda of one layer (float64): held, or read from the factor files (lazy)."""
        if self._source is None:
            return [self.layers[module][k] for k in keys]
        from safetensors import safe_open

        def read(name: str) -> torch.Tensor:
            with safe_open(str(self._source / f"{name}.safetensors"), framework="pt") as f:
                return f.get_tensor(module).double()

        out = {"qa": (lambda: read("activation_eigenvectors")), "qs": (lambda: read("gradient_eigenvectors")),
               "lam": (lambda: read("lambda_matrix") / read("num_lambda_processed"))}
        return [out[k]().to(self._device) if self._device is not None else out[k]() for k in keys]

    # ------------------------------------------------------------------ the interface
    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def to(self, device: torch.device | str) -> "EKFAC":
        if self._source is not None:
            self._device = device
        for d in (self.layers.values() if self._source is None else ()):
            for k in ("qa", "qs", "lam"):
                d[k] = d[k].to(device)
        if self.fallback is not None:
            self.fallback.to(device)
        return self

    def layer_apply(self, module: str, weight: torch.Tensor, bias: torch.Tensor | None, power: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P^power [dW | db] of one layer (float64); a missing bias gradient of a biased layer counts as zero."""
        d = self.layers[module]
        v = weight.double()
        if d["bias"] is not None:
            b = torch.zeros(v.shape[0], 1, dtype=v.dtype, device=v.device) if bias is None else bias.double()[:, None]
            v = torch.cat([v, b], 1)
        qa, qs, lam = (x.to(v.device) for x in self._factors(module))
        rot = qs.T @ v @ qa
        out = qs @ (rot * (lam + d["damp"]).pow(-power)) @ qa.T
        if d["bias"] is None:
            return out, None
        return out[:, :-1], out[:, -1]

    def coupled(self, name: str) -> tuple[str, ...]:
        """A linear layer's weight and bias (one Kronecker block); off the layers, the fallback's grouping."""
        module = self.owner.get(name)
        if module is None:
            return self.fallback.coupled(name) if self.fallback is not None else (name,)
        d = self.layers[module]
        return tuple(n for n in (d["weight"], d["bias"]) if n)

    def apply_tensor(self, name: str, g: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        module = self.owner.get(name)
        if module is None:
            if self.fallback is None:
                raise KeyError(f"EK-FAC covers no layer with the tensor {name!r} and has no fallback; fix: give a "
                               "fallback preconditioner (e.g. the diagonal Fisher) or a target of linear layers only")
            return self.fallback.apply_tensor(name, g, power)
        d = self.layers[module]
        if d["bias"] is not None:
            raise ValueError(f"{name}: the layer {module} has a bias, coupled to its weight under EK-FAC; fix: "
                             "precondition weight and bias together with apply() on the gradient dict")
        return self.layer_apply(module, g, None, power)[0]

    def _apply(self, grads: Mapping[str, torch.Tensor], power: float) -> dict[str, torch.Tensor]:
        out, done = {}, set()
        for name, g in grads.items():
            if name in done:
                continue
            module = self.owner.get(name)
            if module is None:
                out[name] = self.apply_tensor(name, g, power)
                continue
            d = self.layers[module]
            w, b = grads.get(d["weight"]), (grads.get(d["bias"]) if d["bias"] else None)
            if w is None:
                qa, qs = self._factors(module, ("qa", "qs"))
                w = torch.zeros(qs.shape[0], qa.shape[0] - (d["bias"] is not None), dtype=torch.float64,
                                device=g.device)
            pw, pb = self.layer_apply(module, w, b, power)
            if d["weight"] in grads:
                out[d["weight"]] = pw.to(g.device)
            if d["bias"] is not None and d["bias"] in grads:
                out[d["bias"]] = pb.to(g.device)
            done.update({d["weight"], d["bias"]})
        return {k: out[k] for k in grads}

    def apply(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._apply(grads, 1.0)

    def apply_sqrt(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._apply(grads, 0.5)

    def apply_root(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._apply(values, -0.5)

    def apply_inverse(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """P^-1 v = (G + lambda) v (checks: apply then apply_inverse is the identity)."""
        return self._apply(values, -1.0)
