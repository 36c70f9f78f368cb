"""The attribution index (``musicattr index``): built once per model, it answers a query in seconds.

At the paper's lr the scores of Eq. 1 are first order in the Eq. 2 update:

    tau_i ~= <g_i, theta_unlearned - theta0> = lr/N g_i^T (F + lambda)^-1 g_q = <phi_i, psi>,
    phi_i = (F + lambda)^-1/2 g_i,    psi = lr/N (F + lambda)^-1/2 g_q

with g_i the gradient of item i's scoring loss (its T scoring draws, seed and M_L, as Eq. 1) and g_q the
query's unlearning gradient (K draws, M_U, as Eq. 2), over the target tensors; lambda = damping * mean(F)
over them. For every training item the index stores

    P phi_i      k numbers, P the seeded sign sketch of ``musicattr.attribution.sketch``
    s_i          ||phi_i|| exactly (the sensitivity of the relative score tau_i / s_i)
    L(z_i, theta0)   the baseline loss, a by-product of the gradient's forward pass

and a query scores every item by one product with the N x k matrix (``musicattr.attribution.query``):
tau^_i = <P phi_i, P psi>. phi_i comes tensor by tensor from one backward pass per item with the
preconditioner kept exactly (``musicattr.attribution.gradients``).

``IndexModule`` is a prediction pass over the latent store (``StorePredictDataModule``; DDP, resumable):
a ``PartsWriter`` writes each rank's rows as shards, rank 0 merges them. Layout of the index folder:

    shards/run.json                         the provenance: what the index was built from (the run key)
    shards/part-r<rank>-<id>.safetensors    phi [n, k] at the index's precision (float32; float16 or int8 with
                                            phi_scale [n], ``index_store``), sensitivity [n] and baseline_loss [n]
                                            float64 (item indices in the metadata; each shard written atomically)
    items.parquet                           index, item_id, shard, row, sensitivity, baseline_loss
    index.json                              provenance, N, k, precision and the shards (written last: the index
                                            is done; no precision entry: float32)

Reading (``AttributionIndex``): the shards are memory-mapped and streamed in blocks; ``scores`` gives the
dense N x Q table (what ``musicattr query`` writes), ``top`` only the exact top-m per query with a running
top-m (memory O(block + m Q), never N x Q); ``musicattr.attribution.index_search`` adds faiss.

The merge also fills the baseline and sensitivity caches of the store (``<store>/baselines/``,
``<store>/sensitivity/``), so a later exact ``musicattr attribute`` with the same keys reuses them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import pandas as pd
import torch

from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.attribution.cache import baseline_key, cache_path, sensitivity_key, write_cache
from musicattr.attribution.gradients import preconditioned_gradients
from musicattr.attribution.index_store import (INDEX_FILE, ITEMS_FILE, PRECISIONS, SHARDS, TopK, bytes_per_item,
                                               check_precision, encode, stream)
from musicattr.attribution.preconditioner import DiagonalFisher
from musicattr.attribution.score import full_precision
from musicattr.attribution.sketch import make_projection
from musicattr.attribution.task import AttributionTask, attach_task
from musicattr.parts import Parts, PartsWriter, RunMismatchError, TensorFormat

log = logging.getLogger(__name__)
FORMAT = 1
# provenance entries a query checks, with the option that sets each when building
CHECKED = {"checkpoint_fingerprint": "checkpoint", "fisher_fingerprint": "fisher", "store_fingerprint": "store",
           "task": "task", "tensors": "target", "damping": "damping", "num_draws": "num_draws", "seed": "seed",
           "mask_loss": "mask_loss", "k": "k", "projection": "projection", "projection_seed": "projection_seed"}


class IndexMismatchError(RunMismatchError):
    """An index (or its shards) was built with other settings than the ones given."""


class IndexModule(L.LightningModule):
    """Builds the attribution index over the latent store (with ``StorePredictDataModule`` and
    ``Trainer(inference_mode=False)``)."""

    def __init__(self, checkpoint: str, fisher: str, out: str, task: AttributionTask | None = None,
                 target: str = "all", damping: float = 1e-3, num_draws: int = 32, seed: int = 0,
                 mask_loss: bool = False, draws_per_forward: int = 32, k: int | None = 32768,
                 projection: str = "sketch", projection_seed: int = 0, precision: str = "float32",
                 flush_every: int = 10, overwrite: bool = False, write_caches: bool = True):
        """Args: ``fisher`` the diagonal Fisher of ``checkpoint``; ``target`` the tensors (a layer group or regex;
        as the unlearning target); ``damping`` lambda = damping * mean(F) (as Eq. 2); ``num_draws`` T, ``seed`` and
        ``mask_loss`` M_L: the scoring draws of Eq. 1; ``draws_per_forward`` draws per forward (>= T: the item's
        gradient is never whole, see ``gradients``); ``k`` the sketch size (``projection`` 'sketch'; 'identity'
        stores phi itself, k = number of parameters); ``precision`` of the stored rows: float32, float16 or int8
        (the last two with a per-row scale; error bounds in ``index_store``); ``write_caches`` fills the store's
        baseline and sensitivity caches."""
        check_precision(precision)
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        attach_task(self, task, checkpoint, target)  # task, theta0, params, checkpoint_fp
        self.precond = DiagonalFisher.load(fisher, self.params, damping, self.checkpoint_fp)
        prov = self.precond.provenance()
        self.fisher_fp, self.fisher_items = prov["fisher_fingerprint"], prov["num_items"]
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.projection = make_projection(projection, self.sizes, k, projection_seed)
        self.k = self.projection.k
        self.out = Path(out)
        self.parts = Parts(self.out / SHARDS, TensorFormat("cat"), self.provenance, IndexMismatchError(
            f"{self.out} holds an index (or shards of one) built with other settings (checkpoint, Fisher, store, "
            f"task, tensors, damping, T, seed, M_L, k, projection or precision: see "
            f"{self.out / SHARDS / 'run.json'}); fix: "
            "choose another out, or pass --model.overwrite true to rebuild it"))

    # ---------------------------------------------------------------- provenance
    def provenance(self) -> dict[str, Any]:
        """What the index was built from: its key (the shards' run.json, index.json) and what queries check."""
        h = self.hparams
        store = self.trainer.datamodule.store
        return {"format": FORMAT, "checkpoint": h.checkpoint, "checkpoint_fingerprint": self.checkpoint_fp,
                "fisher": h.fisher, "fisher_fingerprint": self.fisher_fp, "fisher_num_items": self.fisher_items,
                "store": str(store.root), "store_fingerprint": store.fingerprint, **self.task.identity(),
                "target": h.target, "tensors": sorted(self.params), "parameters": sum(self.sizes.values()),
                "damping": float(h.damping), "num_draws": int(h.num_draws), "seed": int(h.seed),
                "mask_loss": bool(h.mask_loss), "projection": h.projection, "k": self.k,
                "projection_seed": int(h.projection_seed),
                # float32 is not recorded: an index built before precisions existed keeps its key
                **({"precision": h.precision} if h.precision != "float32" else {}),
                "dtype": str(next(iter(self.params.values())).dtype), "device": self.device.type}

    # ---------------------------------------------------------------- the pass
    def configure_callbacks(self):
        return [PartsWriter(self.parts, self.merge, self.hparams.flush_every, self.hparams.overwrite)]

    def setup(self, stage: str) -> None:
        h = self.hparams
        store = self.trainer.datamodule.store
        self.key = self.provenance()  # kept: at merge time the model is back on the CPU
        base = baseline_key(self.checkpoint_fp, store, self.task, self.theta0, h.num_draws, h.seed, h.mask_loss,
                            self.device)
        self.cache_keys = {"baselines": base,
                           "sensitivity": sensitivity_key(base, self.fisher_fp, self.params, h.damping)}
        done = self.out / INDEX_FILE
        if self.trainer.is_global_zero and done.exists() and json.loads(done.read_text()).get("provenance") != self.key:
            done.unlink()  # the shards were claimed for a rebuild (overwrite): the old index is gone
        log.info("index: %d items, %d tensors (%d parameters) -> k = %d (%s), T = %d draws per item",
                 len(store), len(self.params), sum(self.sizes.values()), self.k, h.projection, h.num_draws)

    def on_predict_start(self) -> None:
        if self._trainer is not None:  # outside a Trainer (scripts/bench) there is no loop to tell
            self.trainer.predict_loop.return_predictions = False  # the PartsWriter keeps the rows, not the loop
        self.projection.to(self.device)
        self.precond.to(self.device)

    def predict_step(self, batch, batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        b = len(batch["item_id"])
        phi = torch.zeros(b, self.k, dtype=torch.float64, device=self.device)
        sq = torch.zeros(b, dtype=torch.float64, device=self.device)

        def take(j: int, name: str, g: torch.Tensor) -> None:
            sq[j] += g.double().pow(2).sum()
            self.projection.add(phi[j], name, g)

        with full_precision(self.device):  # theta0's losses go into the float32 baseline cache: never bf16
            loss = preconditioned_gradients(self.task, self.theta0, self.params, self.precond, batch, h.seed,
                                            h.num_draws, take,
                                            mask=h.mask_loss, draws_per_forward=h.draws_per_forward)
        return {"index": [int(i) for i in batch["index"]], **encode(phi, h.precision),
                "sensitivity": sq.sqrt().cpu(),
                "baseline_loss": loss.mean(1), "baseline_draws": loss}

    # ---------------------------------------------------------------- the merge
    def merge(self, parts: Parts) -> None:
        from safetensors import safe_open

        store = self.trainer.datamodule.store
        rows, seen = [], set()
        for path in parts.files():  # the small columns only: phi stays in its shard
            idx = parts.format.indices(path)
            again = seen.intersection(idx)
            if again:
                raise RuntimeError(f"{path} repeats {len(again)} items of another shard; fix: pass "
                                   "--model.overwrite true to rebuild the index")
            seen.update(idx)
            with safe_open(str(path), "pt") as f:
                rows.append(pd.DataFrame({"index": idx, "shard": f"{SHARDS}/{path.name}", "row": np.arange(len(idx)),
                                          "sensitivity": f.get_tensor("sensitivity").numpy(),
                                          "baseline_loss": f.get_tensor("baseline_loss").numpy(),
                                          "baseline_draws": list(f.get_tensor("baseline_draws").numpy())}))
        items = store.items[["index", "item_id"]].merge(pd.concat(rows), on="index", how="left")
        missing = items["shard"].isna().sum()
        if missing:
            raise RuntimeError(f"{missing} items of {store.root} have no row in {parts.folder}; fix: rerun to resume")
        with atomic_path(self.out / ITEMS_FILE) as tmp:
            items.drop(columns="baseline_draws").to_parquet(tmp, index=False)
        if self.hparams.write_caches:
            for kind, columns in (("baselines", ["baseline_loss", "baseline_draws"]), ("sensitivity", ["sensitivity"])):
                write_cache(items[["index", *columns]], cache_path(store.root, kind, self.cache_keys[kind]),
                            self.cache_keys[kind])
        shards = items.groupby("shard", sort=True).size()
        precision, size = self.hparams.precision, bytes_per_item(self.k, self.hparams.precision)
        atomic_write_json(self.out / INDEX_FILE, {"provenance": self.key, "num_items": len(items), "k": self.k,
                                                  "precision": precision,
                                                  "shards": [{"file": f, "rows": int(n)} for f, n in shards.items()],
                                                  "bytes_per_item": size})
        log.info("index: %s (%d items x k = %d, %s, %.1f MB)", self.out, len(items), self.k, precision,
                 len(items) * size / 1e6)


class AttributionIndex:
    """Read side of a finished index: its provenance, items, and the product of its rows with query vectors."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        meta = self.root / INDEX_FILE
        if not meta.exists():
            raise FileNotFoundError(f"{meta} not found: {self.root} is not a finished attribution index; fix: run "
                                    "`musicattr index` (it resumes an interrupted build) or check the path")
        info = json.loads(meta.read_text())
        self.provenance: dict[str, Any] = info["provenance"]
        self.k, self.num_items = int(info["k"]), int(info["num_items"])
        self.precision = str(info.get("precision", self.provenance.get("precision", "float32")))
        if self.precision not in PRECISIONS:
            raise IndexMismatchError(f"{meta} gives precision {self.precision!r}, which this version does not read "
                                     f"({', '.join(PRECISIONS)}); fix: rebuild the index with `musicattr index "
                                     "--model.precision float32|float16|int8`, or update musicattr")
        self.items = pd.read_parquet(self.root / ITEMS_FILE)
        if len(self.items) != self.num_items:
            raise IndexMismatchError(f"{self.root / ITEMS_FILE} has {len(self.items)} rows, {meta} says "
                                     f"{self.num_items}; fix: rerun `musicattr index` to merge it again")

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse the index when a given setting (not None) differs from its provenance, with the fix."""
        diff = {key: (self.provenance.get(key), want) for key, want in expected.items()
                if want is not None and json.loads(json.dumps(want)) != self.provenance.get(key)}
        if diff:
            lines = ", ".join(f"{key}: index {have!r}, given {want!r}" for key, (have, want) in diff.items())
            options = sorted({CHECKED.get(key, key) for key in diff})
            raise IndexMismatchError(
                f"the index {self.root} was built with other settings ({lines}); fix: rebuild it with "
                f"`musicattr index` and these settings ({', '.join('--model.' + o for o in options)}) into another "
                f"--model.out, or query with the index's settings")

    def _query(self, psi: torch.Tensor, k: int | None) -> tuple[np.ndarray, int]:
        """psi [k_index, Q] folded to ``k`` as float32 [k, Q] (checked), and that k."""
        from musicattr.attribution.sketch import fold

        if psi.ndim != 2 or psi.shape[0] != self.k:
            raise ValueError(f"query vectors have shape {tuple(psi.shape)}, the index {self.root} needs "
                             f"[k = {self.k}, Q]")
        if k is not None and k != self.k and self.provenance["projection"] != "sketch":
            raise ValueError(f"only a sketch folds to a smaller k; this index's projection is "
                             f"{self.provenance['projection']!r}")
        k = k or self.k
        return fold(psi.T.double(), k).T.float().cpu().numpy(), k

    def blocks(self, psi: torch.Tensor, k: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``items``, tau^ [b, Q] float64) block by block: the shards memory-mapped and streamed
        (one block of about ``index_store.BLOCK_BYTES`` in memory), rows decoded to float32 and folded to ``k``."""
        q, k = self._query(psi, k)
        for pos, rows, scale in stream(self.root, self.items, self.k, k if k != self.k else None, scaled=False):
            tau = (rows @ q).astype(np.float64)
            yield pos, tau if scale is None else tau * scale[:, None]

    def scores(self, psi: torch.Tensor, k: int | None = None) -> np.ndarray:
        """<P phi_i, P psi_q> for every item i (rows in ``items`` order) and query q: psi [k, Q] -> [N, Q]
        (float64; a float32 product per block), one streamed pass over the shards.
        ``k``: the scores of the sketch at a divisor k of the index's (both sides folded, ``sketch.fold``)."""
        out = np.zeros((self.num_items, psi.shape[1]), dtype=np.float64)
        for pos, tau in self.blocks(psi, k):
            out[pos] = tau
        return out

    def top(self, psi: torch.Tensor, m: int, k: int | None = None, relative: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``m`` items per query without the N x Q table: (positions in ``items`` [m, Q], tau^ [m, Q]),
        largest first (ties: lower position first), by tau^ or, with ``relative``, by tau^_i / s_i. One streamed
        pass; memory one block plus O(m Q)."""
        sens = self.items["sensitivity"].to_numpy(dtype=np.float64) if relative else None
        head = TopK(min(m, self.num_items), psi.shape[1])
        for pos, tau in self.blocks(psi, k):
            head.add(pos, tau / sens[pos, None] if relative else tau, tau)
        pos, _, tau = head.result()
        return pos, tau
