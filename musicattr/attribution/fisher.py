"""Diagonal Fisher information of theta0 (paper Section 2.2).

    F_jj = 1/N sum_i 1/T sum_t ( dL_t(z_i, theta) / dtheta_j )^2

with L_t the single-draw loss of the attribution task (``AttributionTask.draw_loss``): per-item,
per-timestep squared gradients, never the square of a batch-mean gradient. The draws of item i
are keyed ``fisher/<id>``: the Fisher never reuses the scoring draws of the same item.
Per-sample gradients come from torch.func (vmap over grad) or, as the reference, a loop; the two give the
same sums up to float round-off (tests/attribution/test_fisher.py). Which is faster depends on the machine
(``make bench``: vmap 1.37x the loop on one 2-core CPU, 0.25x on another of the same kind), so ``vectorize``
defaults to ``auto``: on the first batch of the pass, each way is timed on the same ``chunk_size`` examples
(after a one-example warm-up of each) and the faster one computes that batch and every later one
(``choose_vectorize``). The probe's own sums are discarded, so an ``auto`` Fisher is bit for bit the Fisher of
``vectorize: vmap`` or ``loop``, whichever was chosen; the choice and both timings are written to the Fisher's
metadata (``vectorize``). A vmap that raises (no batching rule, out of memory) loses the probe, and its error is
recorded. Each DDP rank chooses on its own first batch; the metadata holds rank 0's choice.

Precision. The squared gradients are summed in float64 (the parts and the merge) from float32 gradients: theta0
stays float32, so its gradients are float32 even under ``--trainer.precision bf16-mixed``, where Lightning's
plugin runs the forward and backward passes under bfloat16 autocast. That is allowed here: the Fisher is only
used through the damped (F + lambda)^-1, and a relative change delta of its entries changes Eq. 2's step (and the
relative score's s_i) elementwise by at most about delta; bf16's rounding changes the Fisher by about 2e-2 per
tensor (relative, in norm) on the tests' tiny DiT with 12 draws in all (tests/test_bf16_path.py; allowed: 0.1),
and ``scripts/gpu_check.sh`` prints the figure for the demo on a GPU. The precision, when not ``32-true``, is
part of the parts' key and the file's metadata. Refused: ``16-mixed`` (a prediction pass has no loss scaling,
so small per-sample gradients underflow in float16) and the ``-true`` half precisions (they cast theta0 itself).
On the CPU, torch's vmap cannot differentiate a layer norm under bf16 autocast (pytorch/pytorch#184890: the
CPU autocast has no policy for layer_norm, and the batched backward meets mixed dtypes); there ``auto`` takes
the loop, and ``vectorize: vmap`` fails with a message that names the fix. On CUDA, autocast runs layer_norm
in float32 and the bug should not arise (not verified here: no GPU).

``musicattr fisher`` is one prediction pass over the latent store (``FisherModule`` with the
store's ``StorePredictDataModule``): each batch returns its sums of squared gradients, the
``PartsWriter`` adds them up per rank and writes parts to ``<out>.parts/`` (a killed run resumes
by skipping the items already summed), and rank 0 merges the parts (float64) into ``<out>``
(safetensors, with metadata naming the checkpoint, store, task, N, T, seed, mask and parameters).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
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


def _slice(ex, sl: slice):
    """Examples ``sl`` of flattened examples (z, t, eps, cond, mask)."""
    z, t, eps, c, m = ex
    return z[sl], t[sl], eps[sl], {k: v[sl] for k, v in c.items()}, None if m is None else m[sl]


def _sum_vmap(task: AttributionTask, model, params: Mapping[str, torch.Tensor], ex, chunk_size: int | None
              ) -> dict[str, torch.Tensor]:
    """sum over the examples of their squared per-sample gradients (float64), vmap(grad) ``chunk_size`` at a time."""
    z, m = ex[0], ex[4]
    detached = {k: v.detach() for k, v in params.items()}

    def single(p, z1, t1, e1, c1, m1):
        kw = {k: v[None] for k, v in c1.items()}
        return task.draw_loss(model, z1[None], t1[None], e1[None], kw, None if m1 is None else m1[None], params=p)[0]

    per_sample = vmap(grad(single), in_dims=(None, 0, 0, 0, 0, None if m is None else 0))
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in detached.items()}
    step = chunk_size or z.shape[0]
    for a in range(0, z.shape[0], step):
        try:
            g = per_sample(detached, *_slice(ex, slice(a, a + step)))
        except RuntimeError as e:
            if _autocast_on(z.device):
                raise RuntimeError(
                    f"{e}\nThe Fisher's vmap path failed under {z.device.type} autocast (mixed precision); on the CPU "
                    "torch's vmap cannot differentiate a layer norm under bf16 autocast (pytorch/pytorch#184890). fix: "
                    "--model.vectorize auto (takes the per-sample loop when vmap fails) or false, or "
                    "--trainer.precision 32-true") from e
            raise
        for k, v in g.items():
            out[k] += v.double().pow(2).sum(0)
    return out


def _sum_loop(task: AttributionTask, model, params: Mapping[str, torch.Tensor], ex) -> dict[str, torch.Tensor]:
    """The same sum with one backward pass per example (the reference)."""
    z, t, eps, c, m = ex
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


def squared_grads_vmap(task: AttributionTask, model, params: Mapping[str, torch.Tensor], batch, seed: int, draws, *,
                       namespace: str = FISHER, mask: bool = False, chunk_size: int | None = 16
                       ) -> dict[str, torch.Tensor]:
    """sum over items and draws of (dL_t(z_i)/dtheta)^2 (float64), per-sample gradients by vmap(grad).

    Examples are processed ``chunk_size`` at a time and squared-summed at once, so memory holds at most
    ``chunk_size`` per-sample gradients."""
    return _sum_vmap(task, model, params, _examples(task, model, batch, seed, draws, namespace, mask), chunk_size)


def squared_grads_loop(task: AttributionTask, model, params: Mapping[str, torch.Tensor], batch, seed: int, draws, *,
                       namespace: str = FISHER, mask: bool = False) -> dict[str, torch.Tensor]:
    """Reference: the same sum with one backward pass per (item, draw)."""
    return _sum_loop(task, model, params, _examples(task, model, batch, seed, draws, namespace, mask))


VECTORIZE = {True: "vmap", False: "loop", "true": "vmap", "false": "loop", "vmap": "vmap", "loop": "loop",
             "auto": "auto"}


def vectorize_mode(value: bool | str) -> str:
    """'vmap', 'loop' or 'auto' from a config's ``vectorize`` (true = vmap, false = loop)."""
    key = value.lower() if isinstance(value, str) else bool(value)
    if key not in VECTORIZE:
        raise ValueError(f"vectorize {value!r}; fix: auto (time both on the first batch, keep the faster), "
                         "vmap / true (torch.func) or loop / false (one backward per example)")
    return VECTORIZE[key]


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_vectorize(task: AttributionTask, model, params: Mapping[str, torch.Tensor], ex,
                     chunk_size: int | None) -> dict[str, Any]:
    """Time vmap(grad) and the per-sample loop on the same first ``chunk_size`` examples of ``ex`` (one chunk of
    vmap's work; the loop's cost is linear in examples), after a one-example warm-up of each, and return the
    choice: {"choice": "vmap" | "loop", "seconds": {"vmap": s, "loop": s}, "examples": n, "device": type} (with
    "vmap_error" when vmap raised). The sums computed here are discarded: the caller computes the batch with the
    chosen way, so the Fisher is the chosen way's, bit for bit."""
    z = ex[0]
    n = min(chunk_size or z.shape[0], z.shape[0])
    probe, one = _slice(ex, slice(0, n)), _slice(ex, slice(0, 1))
    seconds: dict[str, float] = {}
    info: dict[str, Any] = {"examples": n, "device": z.device.type}
    runs = {"vmap": lambda e: _sum_vmap(task, model, params, e, chunk_size),
            "loop": lambda e: _sum_loop(task, model, params, e)}
    for name in ("vmap", "loop"):
        try:
            runs[name](one)  # warm-up: first-call costs (allocator, dispatch, kernels) are not timed
            _sync(z.device)
            start = time.perf_counter()
            runs[name](probe)
            _sync(z.device)
            seconds[name] = time.perf_counter() - start
        except RuntimeError as e:
            if name == "loop":
                raise
            info["vmap_error"] = str(e).splitlines()[0][:300]
            if z.device.type == "cuda":
                torch.cuda.empty_cache()
    info["seconds"] = seconds
    info["choice"] = "vmap" if "vmap" in seconds and seconds["vmap"] <= seconds["loop"] else "loop"
    return info


def merge_fisher(parts: Parts, out: Path, key: dict[str, Any], names: list[str],
                 provenance: dict[str, Any] | None = None) -> None:
    """F = (sum of part sums) / (N T), each item counted once; writes ``out`` (safetensors) with ``key`` and
    ``provenance`` (how it was computed, not what it depends on: e.g. the vectorize choice) as metadata."""
    from musicattr.tensor_file import TensorFileReader, save_tensors

    files, seen = parts.files(), set()
    for p in files:
        idx = parts.format.indices(p)
        if seen.intersection(idx):
            raise RuntimeError(f"{p} repeats items already summed; fix: delete {parts.folder} and rerun")
        seen.update(idx)
    n, t = len(seen), int(key["num_draws"])
    fisher = {}
    with contextlib.ExitStack() as stack:   # tensor by tensor: one float64 sum at a time, never every part whole
        opened = [stack.enter_context(TensorFileReader(p)) for p in files]   # plain reads: no mapped pages kept
        for k in names:
            total = None
            for f in opened:
                v = f.get_tensor(k)
                total = v if total is None else total + v
            fisher[k] = (total / (n * t)).float().contiguous()
    meta = {k: json.dumps(v) for k, v in {**(provenance or {}), **key, "num_items": n, "parameters": names}.items()}
    with atomic_path(out) as tmp:
        save_tensors(fisher, tmp, metadata=meta)
    log.info("fisher: %s (N = %d items, T = %d draws, %d tensors)", out, n, t, len(names))


def load_fisher(path: str, checkpoint_fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Fisher tensors and metadata; refuses a Fisher computed from another checkpoint."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Fisher file not found: {path}; fix: run `musicattr fisher` first")
    from musicattr.tensor_file import TensorFileReader

    with TensorFileReader(path) as f:   # one open; plain reads: no page of the file stays mapped beside the tensors
        meta = {k: json.loads(v) for k, v in (f.metadata or {}).items()}
        if checkpoint_fingerprint and "checkpoint_fingerprint" not in meta:
            raise FisherMismatchError(f"{path} records no checkpoint fingerprint, so nothing says it is the Fisher of "
                                      f"the checkpoint given now; fix: rerun `musicattr fisher` with this checkpoint")
        if checkpoint_fingerprint and meta["checkpoint_fingerprint"] != checkpoint_fingerprint:
            raise FisherMismatchError(
                f"{path} was computed from checkpoint {meta.get('checkpoint')} (fingerprint "
                f"{meta.get('checkpoint_fingerprint')}), not from the checkpoint given now ({checkpoint_fingerprint}); "
                "fix: rerun `musicattr fisher` with this checkpoint")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


class FisherModule(L.LightningModule):
    """One prediction pass of theta0 over the latent store: each batch's sums of squared per-sample gradients.

    Use with ``StorePredictDataModule`` and ``Trainer(inference_mode=False)``; the ``PartsWriter`` it
    configures sums, writes and merges (``<out>.parts/``, then ``<out>``)."""

    def __init__(self, checkpoint: str, out: str, task: AttributionTask | None = None, num_draws: int = 8,
                 seed: int = 0, target: str = "all", use_mask: bool = False, vectorize: bool | str = "auto",
                 chunk_size: int = 16, flush_every: int = 20, overwrite: bool = False):
        """Args: ``task`` the attribution task (default: the SAT DiT of ``musicattr fit``); ``num_draws`` T
        timesteps per item; ``target`` the layer group covered (``all`` covers every unlearning group);
        ``use_mask`` the loss over non-padded frames only; ``vectorize`` how per-sample gradients are taken:
        ``auto`` (time both on the first batch, keep the faster; see the module's docstring), ``vmap`` / true
        (torch.func vmap(grad)) or ``loop`` / false (one backward per example, the reference); ``chunk_size``
        per-sample gradients held at once by vmap; ``flush_every`` batches per part."""
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.vectorize = vectorize_mode(vectorize)
        self.vectorize_info: dict[str, Any] = {"mode": self.vectorize}
        attach_task(self, task, checkpoint, target)  # task, theta0, params, checkpoint_fp
        self.out = Path(out)
        self.parts = Parts(Path(f"{out}.parts"), TensorFormat("sum"), self.run_key, FisherMismatchError(
            f"{out}.parts holds partial sums of another Fisher run (other checkpoint, store, task, draws, seed, "
            "target, mask or precision); fix: delete that folder, choose another output path, or pass "
            "--model.overwrite true"))

    def run_key(self) -> dict[str, Any]:
        """What the Fisher depends on (its parts' key and the final file's metadata)."""
        store = self.trainer.datamodule.store
        return {"checkpoint": self.hparams.checkpoint, "checkpoint_fingerprint": self.checkpoint_fp,
                "store": str(store.root), "store_fingerprint": store.fingerprint, **self.task.identity(),
                "num_draws": self.hparams.num_draws, "seed": self.hparams.seed, "target": self.hparams.target,
                "use_mask": self.hparams.use_mask,
                # 32-true is not recorded: a Fisher computed before precisions were recorded keeps its key
                **({"precision": self.precision} if self.precision != "32-true" else {})}

    @property
    def precision(self) -> str:
        """The Trainer's precision ('32-true' without a Trainer)."""
        return str(self.trainer.precision) if self._trainer is not None else "32-true"

    def configure_callbacks(self):
        check_precision(self.precision)  # before the PartsWriter records the key, on every rank
        return [PartsWriter(self.parts, self.merge, self.hparams.flush_every, self.hparams.overwrite)]

    def on_predict_start(self) -> None:
        # the PartsWriter takes each batch's sums as they come; the loop must not also keep them (at 1 B parameters
        # every batch's sums are 8 GB of float64)
        self.trainer.predict_loop.return_predictions = False

    def merge(self, parts: Parts) -> None:
        info = self.vectorize_info
        if self.vectorize == "auto" and "choice" not in info:
            info = {**info, "choice": None, "note": "rank 0 computed no batch in this run (a resumed run)"}
        merge_fisher(parts, self.out, self.run_key(), list(self.params), {"vectorize": info})

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        ex = _examples(self.task, self.theta0, batch, h.seed, range(h.num_draws), FISHER, h.use_mask)
        way = self.vectorize
        if way == "auto":
            if "choice" not in self.vectorize_info:
                self.vectorize_info.update(choose_vectorize(self.task, self.theta0, self.params, ex, h.chunk_size),
                                           rank=self.global_rank)
                log.info("fisher: vectorize auto -> %s (%s)", self.vectorize_info["choice"], ", ".join(
                    f"{k} {v:.3f} s" for k, v in self.vectorize_info["seconds"].items()))
            way = self.vectorize_info["choice"]
        sq = (_sum_vmap(self.task, self.theta0, self.params, ex, h.chunk_size) if way == "vmap"
              else _sum_loop(self.task, self.theta0, self.params, ex))
        return {"index": [int(i) for i in batch["index"]], **sq}


# the Trainer precisions a Fisher pass accepts (Lightning's names); see the module's docstring
FISHER_PRECISIONS = ("32-true", "64-true", "bf16-mixed")


def check_precision(precision: str) -> None:
    """Refuse Trainer precisions under which the Fisher would be wrong (16-mixed, the half -true ones)."""
    if precision not in FISHER_PRECISIONS:
        why = ("a prediction pass has no loss scaling, so small per-sample gradients underflow in float16"
               if precision == "16-mixed" else "it casts theta0 itself to a lower precision than the checkpoint's")
        raise ValueError(f"the Fisher cannot run at --trainer.precision {precision}: {why}; fix: "
                         "--trainer.precision bf16-mixed (bf16 autocast, float32 theta0) or 32-true")
