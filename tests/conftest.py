"""Shared fixtures: a tiny SAT DiT config, a synthetic latent store and a theta0 checkpoint.

Everything runs on the CPU with ``MUSICATTR_TEST_THREADS`` torch threads per process (default 1; the
CLI subprocesses of ``cli`` get the same), and every test starts from seeded global generators
(``_seed_everything``), so an outcome depends neither on test order nor on the machine.

Two computation paths (other batch shapes, draws per forward, thread counts, processes, instruction
sets) give float32 losses that agree only to rounding: tests that compare such paths use the
tolerances below and are marked ``paths``; ``make test`` reruns them with 2 threads.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import random
import sys
from pathlib import Path

THREADS = int(os.environ.get("MUSICATTR_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["MKL_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np
import pytest
import torch

torch.set_num_threads(THREADS)

# A float32 loss (a mean over C x L squared errors, averaged over T draws) computed along two paths differs by
# float32 rounding of its reductions: measured up to 3e-8 relative (Intel AVX-512/AMX against AMD EPYC, batch
# shape 4 vs 16 draws per forward). LOSS_RTOL keeps a 30x margin over that; README "Reproducibility" states it.
LOSS_RTOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def chdir(d):
    """Run the block in folder ``d`` (the stages resolve the tests' relative paths there)."""
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def stage_trainer(**kw):
    """The Lightning Trainer of the in-process stage tests: CPU, one device, no logger, progress bar or summary,
    no distributed sampler, gradients on (``inference_mode=False``); ``kw`` adds or overrides options."""
    import lightning as L

    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "use_distributed_sampler": False, "inference_mode": False,
                        "default_root_dir": "lightning", **kw})


def load_script(name: str):
    """``scripts/<name>.py`` imported as module ``name`` (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seed torch, numpy and random before every test: no assertion depends on test order."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def assert_losses_close(a, b, rtol: float = LOSS_RTOL) -> None:
    """Per-item losses of two computation paths agree to float32 rounding (relative)."""
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=0)


def score_tolerance(losses, rtol: float = LOSS_RTOL) -> float:
    """Absolute tolerance of a score tau = L' - L whose two losses each carry ``rtol`` relative rounding."""
    return 2 * rtol * float(np.abs(np.asarray(losses, dtype=np.float64)).max())


def assert_scores_close(a, b, losses, rtol: float = LOSS_RTOL) -> None:
    """Scores of two paths agree within the rounding of their losses (``score_tolerance``)."""
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=0,
                               atol=score_tolerance(losses, rtol))


def assert_same_ranking(a, b, tol: float) -> None:
    """Two score vectors whose entries agree within ``tol`` order every pair of items alike, except pairs
    closer than 2 tol (a tie within rounding may fall either way; any other swap fails)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = a[:, None] - a[None, :], b[:, None] - b[None, :]
    swapped = (np.sign(da) != np.sign(db)) & (np.maximum(np.abs(da), np.abs(db)) > 2 * tol)
    assert not swapped.any(), f"{int(swapped.sum()) // 2} pairs ordered differently beyond 2 x {tol:.2e}"

TINY_DIT = {
    "model_type": "diffusion_cond", "sample_rate": 16000, "sample_size": 16 * 2048,
    "model": {
        "io_channels": 4,
        "conditioning": {"cond_dim": 32, "configs": [
            {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
            {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}}]},
        "diffusion": {"type": "dit", "diffusion_objective": "v",
                      "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                      "global_cond_ids": ["seconds_start", "seconds_total"],
                      "config": {"io_channels": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                 "cond_token_dim": 32, "global_cond_dim": 64, "project_cond_tokens": False,
                                 "transformer_type": "continuous_transformer"}}}}


class BareNetTask:
    """Mixin of the tests' toy attribution tasks over a bare torch network: nothing to load, no conditioning, the
    frame mask from ``valid_frames``; a task adds its noise and prediction (and AttributionTask as its base)."""

    def load(self, checkpoint):
        raise NotImplementedError

    def net(self, model):
        return model

    def conditioning(self, model, batch):
        return {}

    def frame_mask(self, model, batch):
        from musicattr.attribution.loss import frame_mask_from_lengths

        return frame_mask_from_lengths(batch["valid_frames"], batch["latents"].shape[-1])


def tiny_autoencoder_config(latent_dim: int = 16, sample_rate: int = 16000) -> dict:
    """A tiny Oobleck VAE (SAT AudioAutoencoder) at the demo's 2048x downsampling."""
    def coder(kind, channels_key, latent):
        return {"type": "oobleck", "config": {channels_key: 1, "channels": 4, "c_mults": [1, 2, 4, 8],
                                              "strides": [4, 4, 8, 16], "latent_dim": latent, "use_snake": False,
                                              **({"final_tanh": False} if kind == "decoder" else {})}}
    return {"model_type": "autoencoder", "sample_rate": sample_rate, "audio_channels": 1, "model": {
        "encoder": coder("encoder", "in_channels", 2 * latent_dim),
        "decoder": coder("decoder", "out_channels", latent_dim),
        "bottleneck": {"type": "vae"}, "latent_dim": latent_dim, "downsampling_ratio": 2048, "io_channels": 1}}


def cli(args, cwd, check=True, timeout=400, **popen):
    """Run ``python -m musicattr.cli ARGS`` in ``cwd`` with the tests' thread count (Popen if popen kwargs);
    the repository and tests/ on its path."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "tests")])  # tests/ holds eps_task (the second task)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "musicattr.cli", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"musicattr {args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def kill_when_parts_appear(proc, parts, pattern: str, timeout: float) -> None:
    """SIGKILL a running stage as soon as its first finished part file exists (a crash mid-run)."""
    import signal
    import time

    from musicattr.atomic import finished_files

    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            # a finished part, not the temporary of a write in progress (whose name also matches the pattern):
            # killing on the temporary leaves no part at all, a race that a slower machine loses more often
            if parts.exists() and finished_files(parts.glob(pattern)):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before any part appeared:\n" + proc.stdout.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def tiny_config(text_dim: int = 32) -> dict:
    cfg = copy.deepcopy(TINY_DIT)
    cfg["model"]["conditioning"]["cond_dim"] = text_dim
    cfg["model"]["diffusion"]["config"]["cond_token_dim"] = text_dim
    cfg["model"]["diffusion"]["config"]["global_cond_dim"] = 2 * text_dim
    cfg["model"]["diffusion"]["config"]["project_cond_tokens"] = text_dim != 32
    return cfg


def make_module(seed: int = 0, perturb: float = 0.05, text_dim: int = 32):
    """A tiny DiffusionModule with non-zero weights everywhere (SAT zero-inits some convs)."""
    from musicattr.models.diffusion_module import DiffusionModule

    torch.manual_seed(seed)
    m = DiffusionModule(tiny_config(text_dim))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m.eval()


def save_checkpoint(module, path) -> str:
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


def make_store(root, n: int = 12, channels: int = 4, frames: int = 16, text_dim: int = 32, seed: int = 0,
               shard_size: int = 5, item_ids=None):
    """A latent store of ``n`` synthetic items with varied valid lengths (zero padding matters);
    item i is ``item_ids[i]`` (default ``audio/trackNNN.wav``)."""
    from musicattr.data.latent_store import LatentStoreWriter

    g = np.random.default_rng(seed)
    w = LatentStoreWriter(root, {"format": 1, "latent_channels": channels, "max_frames": frames, "sample_rate": 16000,
                                 "audio_channels": 1, "downsampling_ratio": 2048, "text_encoder": "synthetic",
                                 "text_dim": text_dim})
    for start in range(0, n, shard_size):
        idx = list(range(start, min(n, start + shard_size)))
        lat = g.standard_normal((len(idx), channels, frames)).astype(np.float32)
        valid = [int(g.integers(3, frames + 1)) for _ in idx]
        for j, v in enumerate(valid):
            lat[j, :, v:] = 0.1  # the encoder's output on silence
        text = g.standard_normal((len(idx), 1, text_dim)).astype(np.float32)
        items = [{"index": i, "item_id": item_ids[i] if item_ids else f"audio/track{i:03d}.wav",
                  "caption": f"caption {i}",
                  "file_name": f"audio/track{i:03d}.wav", "valid_frames": v, "seconds_start": 0,
                  "seconds_total": int(np.ceil(v * 2048 / 16000)), "duration_s": v * 2048 / 16000}
                 for i, v in zip(idx, valid)]
        w.write_shard(f"r0-{start:09d}", lat, text, items)
    return w.finalize(expected=n)


def build_fisher_setup(d, n: int) -> None:
    """In folder ``d``: a store of ``n`` synthetic items, theta0.ckpt and its Fisher fisher.safetensors (T = 4
    draws, batches of 6), as `musicattr fisher` writes it."""
    from musicattr.attribution.fisher import FisherModule
    from musicattr.data.datamodules import StorePredictDataModule

    make_store(d / "store", n=n)
    save_checkpoint(make_module(), d / "theta0.ckpt")
    with chdir(d):
        stage_trainer().predict(FisherModule("theta0.ckpt", "fisher.safetensors", num_draws=4, flush_every=100),
                                datamodule=StorePredictDataModule("store", 6))


@pytest.fixture
def tiny_module():
    return make_module()


@pytest.fixture
def tiny_store(tmp_path):
    return make_store(tmp_path / "store")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return save_checkpoint(make_module(), tmp_path / "theta0.ckpt")


def build_planted_setup(root, n: int = 12) -> dict:
    """A tiny evaluation setup in ``root``: a store of ``n`` items (384-d text) whose audio folder holds a sine
    tone per track and a planted group (tracks 0, 10, 11: copies of track000), a tiny autoencoder, theta0 and its
    Fisher (computed by the Fisher stage's module)."""
    import json

    import lightning as L
    import soundfile as sf

    from musicattr.attribution.fisher import FisherModule
    from musicattr.data.datamodules import StorePredictDataModule
    from musicattr.models.autoencoder_module import AutoencoderModule

    sr, tiny_ae = 16000, tiny_autoencoder_config(latent_dim=4)
    store = make_store(root / "store", n=n, text_dim=384)
    folder = root / "audio_folder"
    (folder / "audio").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i, r in enumerate(store.items.itertuples()):
        t = np.arange(int(r.duration_s * sr)) / sr
        wave = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(folder / r.file_name, wave, sr)
        row = {"file_name": r.file_name, "caption": r.caption}
        if i in (0, 10, 11):
            row["planted_group"] = "audio/track000.wav"
        rows.append(row)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
    torch.manual_seed(0)
    ae = AutoencoderModule(tiny_ae)
    ae_path = root / "ae.ckpt"
    torch.save({"hyper_parameters": {"model_config": tiny_ae}, "state_dict": ae.state_dict()}, ae_path)
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    manifest.update(folder=str(folder), autoencoder=str(ae_path), text_encoder="minilm")
    (root / "store" / "manifest.json").write_text(json.dumps(manifest))
    ckpt = save_checkpoint(make_module(text_dim=384), root / "theta0.ckpt")
    fisher = root / "fisher.safetensors"
    L.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False, inference_mode=False,
              enable_progress_bar=False).predict(FisherModule(ckpt, str(fisher), num_draws=2),
                                                 datamodule=StorePredictDataModule(str(root / "store")))
    return {"root": root, "store": str(root / "store"), "ckpt": ckpt, "fisher": str(fisher), "n": n}


def make_compare_run(compare, store) -> str:
    """A finished-looking `musicattr compare` run under ``compare``: one generated query q000 (seeded latents) and one
    training query t000 (the store's item 2), as queries.csv lists them; returns t000's item id."""
    import pandas as pd

    from musicattr.data.queries import save_query

    gen = Path(compare) / "generated"
    gen.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    save_query(gen / "q000.query.safetensors", torch.randn(4, 16, generator=g), torch.randn(1, 32, generator=g),
               {"query_id": "q000", "caption": "a prompt", "seconds_start": 0, "seconds_total": 2, "valid_frames": 16,
                "duration_s": 2.0})
    item = store.items["item_id"].iloc[2]
    pd.DataFrame([{"query_id": "q000", "kind": "generated", "prompt": "a prompt", "query_item": None},
                  {"query_id": "t000", "kind": "training", "prompt": "x", "query_item": item}]).to_csv(
        Path(compare) / "queries.csv", index=False)
    return item
