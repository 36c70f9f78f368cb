"""``musicattr ekfac``: the EK-FAC factors of theta0 over the latent store, fitted once per model, in one folder.

    G_l ~ (Q_A (x) Q_S) diag(Lambda_l) (Q_A (x) Q_S)^T        per linear layer l of the target group

kronfluence fits the eigenbases Q_A (layer inputs) and Q_S (output gradients) and the eigenvalue corrections Lambda
on (item, draw) examples of the Fisher's draws (``kronfluence_peer.fit_factors``); this stage writes them to ``out``
with ``musicattr_ekfac.json`` (layer mapping and provenance: checkpoint and store fingerprints, draws, seed), where
``musicattr unlearn --ekfac out`` reads them as its preconditioner P = (G + lambda)^-1 ("AbU+", the default of
``make demo``; the diagonal Fisher covers the target tensors outside linear layers). Resumable: a folder fitted with
the same settings on the same checkpoint and store is kept; kronfluence's own work tree sits in ``out/kronfluence``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from musicattr.atomic import atomic_write_json

log = logging.getLogger(__name__)


def run_ekfac(checkpoint: str, store: str, out: str, task: Any = None, target: str = "all", seed: int = 0,
              fit_draws: int = 8, batch_size: int = 16, fisher_kind: str = "empirical",
              threads: int | None = None, device: str = "cpu") -> dict:
    """Fit EK-FAC factors of ``checkpoint`` over ``store`` and write them to ``out``.

    Args:
        checkpoint: theta0 (``musicattr fit``); store: its latent store.
        out: the factors folder (``musicattr unlearn --ekfac out``).
        task: the attribution task (class path or instance; default the SAT DiT); target: its parameter group
            (EK-FAC covers its linear layers).
        seed: draw seed of the fitting examples (keyed ``fisher/<id>``, as the diagonal Fisher's).
        fit_draws: (item, draw) examples per item; batch_size: items per batch.
        fisher_kind: 'empirical' (the diagonal Fisher's kind, so Eq. 2's damping rule means the same) or 'sampled'.
        threads: torch threads (default: leave as set, e.g. by OMP_NUM_THREADS).
        device: where kronfluence fits ('cpu' or 'cuda'); the factors are written the same way from either.
    """
    from musicattr.attribution.ekfac import FACTOR_FILES, MAPPING_FILE
    from musicattr.attribution.task import load_theta, resolve_task
    from musicattr.data.latent_store import LatentStore
    from musicattr.fingerprint import file_fingerprint
    from musicattr.peers.common import linear_layers, store_batches
    from musicattr.peers.kronfluence_peer import analyzer_on_cpu, fit_factors, make_analyzer

    analyzer_on_cpu(device)                                   # an unusable device fails before any work
    if threads:
        torch.set_num_threads(threads)
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found; fix: run `musicattr fit` (make demo) first, or "
                                "pass --checkpoint PATH")
    if fit_draws < 1:
        raise ValueError(f"fit_draws = {fit_draws}; fix: at least 1 draw per item")
    s = LatentStore(store)
    task = resolve_task(task)
    out_dir = Path(out)
    provenance = {"checkpoint_fingerprint": file_fingerprint(checkpoint), "store_fingerprint": s.fingerprint,
                  "task": task.identity(), "target": target, "seed": seed, "batch_size": batch_size}
    _, model = load_theta(task, checkpoint)
    layers = linear_layers(task, model, target)
    mapping = out_dir / MAPPING_FILE
    t0 = time.time()
    analyzer, _ = make_analyzer(task, model, list(layers), out_dir / "kronfluence", device=device, seed=seed,
                                fit_seed=seed)
    name, folder, seconds, reused = fit_factors(analyzer, store_batches(s), layers, fit_draws, batch_size,
                                                fisher_kind, provenance)
    fitted = json.loads((folder / MAPPING_FILE).read_text())
    if not (mapping.exists() and json.loads(mapping.read_text()) == fitted
            and all((out_dir / f"{f}.safetensors").exists() for f in FACTOR_FILES)):
        if mapping.exists():
            mapping.unlink()  # the marker goes first: a half-copied folder never reads as fitted
        for f in FACTOR_FILES:
            tmp = out_dir / f".{f}.safetensors.tmp"
            shutil.copyfile(folder / f"{f}.safetensors", tmp)
            os.replace(tmp, out_dir / f"{f}.safetensors")
        atomic_write_json(mapping, fitted)
        log.info("ekfac: %d linear layers' factors (%s) -> %s", len(layers), name, out_dir)
    else:
        log.info("ekfac: %s is up to date (same checkpoint, store and settings): kept", out_dir)
    result = {"factors": str(out_dir), "layers": len(layers), "fit_reused": reused,
              "fit_seconds": None if seconds is None else round(seconds, 1), "seconds": round(time.time() - t0, 1),
              **provenance}
    print(json.dumps(result))
    return result
