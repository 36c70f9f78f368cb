"""The members of an index ensemble: one model each, with its diagonal Fisher and its attribution index.

A member is either given (``checkpoint``, ``fisher``, ``index``: e.g. the bank's benchmark model with the Fisher and
index `make benchmark-scores` built) or refitted: the bank's recipe (``<bank_dir>/manifest.json``, the recipe every
retrain of the bank follows) on the whole store with the member's training ``seed``, by the bank's own retrain
(``retrain.fit_retrain``, nothing removed, the bank's run key: a refit with seed 0 is the bank's benchmark model).
Its Fisher and index are then built by the ``musicattr fisher`` and ``musicattr index`` commands with the stage
configs the Makefile uses (the same settings as the benchmark model's), in a child process each:

    <work_dir>/member-<seed>/model.ckpt          the refit (last.ckpt while it runs: a rerun resumes)
    <work_dir>/member-<seed>/fisher.safetensors  musicattr fisher (its .parts folder: a rerun resumes)
    <work_dir>/member-<seed>/index/              musicattr index (its shards: a rerun resumes)
    <work_dir>/member-<seed>/costs.json          seconds of the fit, the Fisher and the index

A finished step is skipped when its output belongs to the member's model (checked by fingerprint).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from musicattr.atomic import atomic_write_json
from musicattr.attribution.ensemble import EnsembleError

log = logging.getLogger(__name__)
MODEL, FISHER, INDEX, COSTS = "model.ckpt", "fisher.safetensors", "index", "costs.json"


@dataclass(frozen=True)
class Member:
    """One model of the ensemble. ``seed``: its training seed (names its folder); ``checkpoint`` / ``fisher`` /
    ``index``: given files (None: refit / build them under ``<work_dir>/member-<seed>/``)."""

    seed: int
    checkpoint: str | None = None
    fisher: str | None = None
    index: str | None = None

    @property
    def name(self) -> str:
        return f"member-{self.seed}"

    def folder(self, work_dir: str | Path) -> Path:
        return Path(work_dir) / self.name

    def paths(self, work_dir: str | Path) -> dict[str, str]:
        d = self.folder(work_dir)
        return {"checkpoint": self.checkpoint or str(d / MODEL), "fisher": self.fisher or str(d / FISHER),
                "index": self.index or str(d / INDEX)}


def parse_members(specs: list) -> list[Member]:
    """Members from a config's list: ``{seed, checkpoint, fisher, index}`` (or a bare seed); seeds must not repeat."""
    if not specs:
        raise EnsembleError("no member given; fix: list the members, e.g. members: [{seed: 0, checkpoint: ...}, "
                            "{seed: 1}, {seed: 2}]")
    out = []
    for s in specs:
        s = {"seed": s} if isinstance(s, int) else dict(s)
        unknown = set(s) - {"seed", "checkpoint", "fisher", "index"}
        if "seed" not in s or unknown:
            raise EnsembleError(f"member {s}: give seed, and optionally checkpoint, fisher and index (unknown: "
                                f"{sorted(unknown)})")
        out.append(Member(int(s["seed"]), s.get("checkpoint"), s.get("fisher"), s.get("index")))
    seeds = [m.seed for m in out]
    if len(set(seeds)) != len(seeds):
        raise EnsembleError(f"member seeds repeat in {seeds}; fix: one member per training seed")
    return out


def bank_recipe(bank_dir: str | Path):
    """The recipe of the bank's retrains (its manifest), checked against its fingerprint."""
    from musicattr.counterfactual.recipe import Recipe

    path = Path(bank_dir) / "manifest.json"
    if not path.exists():
        raise EnsembleError(f"{path} not found: the refit members follow the bank's recipe; fix: point bank_dir at a "
                            "bank (assets/bank/demo), or give every member its checkpoint")
    manifest = json.loads(path.read_text())
    rec = Recipe(**{k: v for k, v in manifest["recipe"].items() if k not in ("fingerprint", "describe")})
    if rec.fingerprint() != manifest["recipe"]["fingerprint"]:
        raise EnsembleError(f"{path}: its recipe does not hash to its fingerprint (edited by hand?); fix: restore the "
                            "manifest from git")
    return rec


def refit_key(store, recipe, seed: int) -> dict:
    """The bank's run key of a retrain of the whole store with ``seed`` (what the bank's model.ckpt records)."""
    from musicattr.counterfactual.bank import store_content
    from musicattr.counterfactual.subsets import PlannedRetrain

    return PlannedRetrain((), int(seed)).key({"store": store_content(store), "recipe": recipe.fingerprint()})


def _costs(folder: Path) -> dict:
    p = folder / COSTS
    return json.loads(p.read_text()) if p.exists() else {}


def _record(folder: Path, **values) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / COSTS, {**_costs(folder), **{k: round(v, 1) for k, v in values.items()}})


def fit_member(member: Member, work_dir: str | Path, bank_dir: str | Path, store: str,
               trainer: dict | None = None, checkpoint_every: int = 100) -> str:
    """The member's checkpoint: given, or the bank's recipe refitted on the whole store with its seed (resumable)."""
    from musicattr.counterfactual.retrain import fit_retrain, finished
    from musicattr.data.latent_store import LatentStore

    if member.checkpoint:
        if not Path(member.checkpoint).exists():
            raise EnsembleError(f"{member.name}: checkpoint {member.checkpoint} not found; fix: give an existing "
                                "checkpoint, or leave checkpoint out to refit the bank's recipe with this seed")
        return member.checkpoint
    folder = member.folder(work_dir)
    if finished(folder):
        return str(folder / MODEL)
    rec = bank_recipe(bank_dir)
    key = refit_key(LatentStore(store), rec, member.seed)
    log.info("ensemble: %s: refitting the bank's recipe (%s) on %s with seed %d in %s", member.name, rec.describe(),
             store, member.seed, folder)
    t0 = time.time()
    done_before = _costs(folder).get("fit_s", 0.0)  # an interrupted fit's seconds so far
    try:
        fit_retrain(folder, rec, store, (), member.seed, key, trainer or {"accelerator": "cpu", "devices": 1},
                    checkpoint_every=checkpoint_every, progress_bar=False)
    finally:
        _record(folder, fit_s=done_before + time.time() - t0)
    log.info("ensemble: %s: fitted in %.0f s", member.name, time.time() - t0)
    return str(folder / MODEL)


def _command(stage: str, config: str, options: list[str]) -> list[str]:
    """The stage's command line in a child process (its run root: $MUSICATTR_RUN_ROOT or the config's run.yaml;
    every path it writes is given here)."""
    return [sys.executable, "-m", "musicattr.cli", stage, "--config", str(config), *options]


def _run(cmd: list[str], what: str) -> None:
    log.info("ensemble: %s: %s", what, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}; fix: see its output above, then "
                           "rerun (it resumes)")


def _fisher_done(path: Path, checkpoint: str) -> bool:
    from safetensors import safe_open

    from musicattr.fingerprint import file_fingerprint

    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("checkpoint_fingerprint", "null")) == file_fingerprint(checkpoint)


def _index_done(folder: Path, checkpoint: str, fisher: str) -> bool:
    from musicattr.fingerprint import file_fingerprint

    p = folder / "index.json"
    if not p.exists():
        return False
    prov = json.loads(p.read_text()).get("provenance", {})
    return (prov.get("checkpoint_fingerprint") == file_fingerprint(checkpoint)
            and prov.get("fisher_fingerprint") == file_fingerprint(fisher))


def build_member(member: Member, work_dir: str | Path, bank_dir: str | Path, store: str, fisher_config: str,
                 index_config: str, trainer: dict | None = None,
                 checkpoint_every: int = 100) -> dict[str, str]:
    """The member's checkpoint, Fisher and index (given, or made here; each step resumes), as paths."""
    folder = member.folder(work_dir)
    paths = member.paths(work_dir)
    ckpt = fit_member(member, work_dir, bank_dir, store, trainer, checkpoint_every)
    fisher, index = Path(paths["fisher"]), Path(paths["index"])
    if member.fisher:
        if not fisher.exists():
            raise EnsembleError(f"{member.name}: Fisher {fisher} not found; fix: give the model's Fisher (`musicattr "
                                "fisher`), or leave fisher out to build it")
    elif not _fisher_done(fisher, ckpt):
        t0 = time.time()
        _run(_command("fisher", fisher_config,
                      ["--model.checkpoint", ckpt, "--model.out", str(fisher), "--data.store", store,
                       "--trainer.default_root_dir", str(folder / "fisher")]), f"{member.name}: Fisher")
        _record(folder, fisher_s=time.time() - t0)
    if member.index:
        if not (index / "index.json").exists():
            raise EnsembleError(f"{member.name}: index {index} not found (no index.json); fix: give the model's index "
                                "(`musicattr index`), or leave index out to build it")
    elif not _index_done(index, ckpt, str(fisher)):
        t0 = time.time()
        # write_caches false: the store's baseline and sensitivity caches are not this stage's to fill
        _run(_command("index", index_config,
                      ["--model.checkpoint", ckpt, "--model.fisher", str(fisher), "--model.out", str(index),
                       "--model.write_caches", "false", "--data.store", store,
                       "--trainer.default_root_dir", str(folder / "index-trainer")]), f"{member.name}: index")
        _record(folder, index_s=time.time() - t0)
    return {"checkpoint": ckpt, "fisher": str(fisher), "index": str(index)}
