"""Shared by the report tests: a tiny attribution run made by the real stages, and headless Chromium.

The run (about 10 s) is built once per test session and shared by the test modules that import it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import make_module, make_store, save_checkpoint, tiny_autoencoder_config

SR = 16000
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"  # CI keeps this folder (see .ci/run)
_RUN: dict | None = None


def track_metadata(i: int, file_name: str, caption: str) -> dict:
    """Metadata as the corpus writes it: composed pieces have a composer, tunes a collection."""
    row = {"file_name": file_name, "caption": caption, "title": f"Tune {i}",
           "instrument": ["flute", "church organ", "fiddle"][i % 3], "licence": "test audio"}
    if i % 2:
        row["composer"] = ["J.S. Bach", "G.P. da Palestrina"][(i // 2) % 2]
    else:
        row["collection"] = "O'Neill's Music of Ireland"
    return row


def build_tiny_run(root: Path) -> dict:
    """store + audio folder + theta0 + Fisher -> generate q000 -> unlearn -> attribute (relative), all real."""
    import lightning as L

    from musicattr.attribution.fisher import FisherModule
    from musicattr.data.datamodules import StorePredictDataModule
    from musicattr.attribution.unlearn import run_unlearn
    from musicattr.evaluation.common import score_store
    from musicattr.models.autoencoder_module import AutoencoderModule
    from musicattr.models.generate import generate

    store = make_store(root / "store", n=12, text_dim=384)
    folder = root / "corpus"
    (folder / "audio").mkdir(parents=True)
    rows = []
    for i, r in enumerate(store.items.itertuples()):
        t = np.arange(int(r.duration_s * SR)) / SR
        sf.write(folder / r.file_name, 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t), SR)
        rows.append(track_metadata(i, r.file_name, r.caption))
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
    ae_config = tiny_autoencoder_config(latent_dim=4)
    torch.manual_seed(0)
    ae_path = root / "ae.ckpt"
    torch.save({"hyper_parameters": {"model_config": ae_config}, "state_dict": AutoencoderModule(ae_config).state_dict()},
               ae_path)
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    manifest.update(folder=str(folder), autoencoder=str(ae_path), text_encoder="minilm")
    (root / "store" / "manifest.json").write_text(json.dumps(manifest))
    ckpt = save_checkpoint(make_module(text_dim=384), root / "theta0.ckpt")
    fisher = str(root / "fisher.safetensors")
    L.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False, inference_mode=False,
              enable_progress_bar=False).predict(FisherModule(ckpt, fisher, num_draws=2),
                                                 datamodule=StorePredictDataModule(str(root / "store")))
    generate(ckpt, str(ae_path), str(root / "generated"), ["a low tone"], [1.0], store=str(root / "store"), steps=2)
    unlearned = str(root / "unlearned" / "q000.safetensors")
    run_unlearn(ckpt, fisher, unlearned, query=str(root / "generated" / "q000.query.safetensors"), lr=1e-5,
                num_draws=8)
    scores = root / "attribution" / "q000"
    score_store(ckpt, str(root / "store"), unlearned, str(scores), num_draws=2, seed=0, relative=True)
    return {"root": root, "store": str(root / "store"), "folder": folder, "scores": scores, "ckpt": ckpt,
            "fisher": fisher, "query_audio": root / "generated" / "q000.wav", "n": 12}


@pytest.fixture
def tiny_run(tmp_path_factory) -> dict:
    """The tiny run, built at the first request of the session (test modules share it: do not modify it)."""
    global _RUN
    if _RUN is None:
        _RUN = build_tiny_run(tmp_path_factory.mktemp("report-run"))
    return _RUN


def copy_run(run: dict, dst) -> dict:
    """A private copy of the run's files (store, audio folder, scores, generated query) to modify."""
    for name in ("store", "corpus", "attribution", "generated"):
        shutil.copytree(run["root"] / name, dst / name)
    manifest = json.loads((dst / "store" / "manifest.json").read_text())
    (dst / "store" / "manifest.json").write_text(json.dumps({**manifest, "folder": str(dst / "corpus")}))
    key = json.loads((dst / "attribution" / "q000" / "run.json").read_text())
    key["store"] = str(dst / "store")
    key["unlearned"]["query"] = str(dst / "generated" / "q000.query.safetensors")
    (dst / "attribution" / "q000" / "run.json").write_text(json.dumps(key))
    return {**run, "root": dst, "store": str(dst / "store"), "folder": dst / "corpus",
            "scores": dst / "attribution" / "q000", "query_audio": dst / "generated" / "q000.wav"}


# ------------------------------------------------------------------------------------------ Chromium
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find() -> str | None:
    explicit = os.environ.get("MUSICATTR_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


def chromium_or_skip() -> str:
    """The headless browser: found on PATH (or MUSICATTR_CHROMIUM), else installed with apt (Debian's
    ``chromium``) when this process is root and apt-get exists, else the test is skipped saying why."""
    found = _find()
    if found:
        return found
    if os.environ.get("MUSICATTR_CHROMIUM"):
        pytest.skip(f"MUSICATTR_CHROMIUM={os.environ['MUSICATTR_CHROMIUM']} does not exist; fix: point it at a "
                    "Chromium or Chrome binary, or unset it")
    if os.environ.get("MUSICATTR_NO_BROWSER_INSTALL"):
        pytest.skip("headless Chromium not found and MUSICATTR_NO_BROWSER_INSTALL is set; fix: "
                    "apt-get install -y chromium, or set MUSICATTR_CHROMIUM=/path/to/chrome")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("headless Chromium not found and it cannot be installed here (needs root and apt-get); fix: "
                    "apt-get install -y chromium, or set MUSICATTR_CHROMIUM=/path/to/chrome")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"headless Chromium not found and `{' '.join(cmd)}` failed ({r.returncode}): "
                        f"{(r.stderr or r.stdout)[-500:]}")
    found = _find()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


def chromium(browser: str, page: Path, *args: str, timeout: float = 60) -> str:
    """Run headless Chromium on a local page (no sandbox: tests may run as root); returns stdout."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--autoplay-policy=no-user-gesture-required", "--virtual-time-budget=10000", *args, page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout
