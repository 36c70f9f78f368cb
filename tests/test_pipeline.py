"""Issue-2 flow end to end on a tiny audio folder: autoencoder -> encode -> fit -> generate (CLI)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tiny_autoencoder_config

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
TINY_AE = tiny_autoencoder_config(latent_dim=32)  # the demo DiT takes 32-d latents


def run(*args):
    r = subprocess.run([sys.executable, "-m", "musicattr.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    (d / "audio").mkdir()
    rows = []
    for i, (f0, dur) in enumerate([(220, 1.0), (330, 2.5), (440, 0.6), (550, 3.0), (660, 1.7), (770, 2.2)]):
        t = np.arange(int(dur * SR)) / SR
        sf.write(d / "audio" / f"tone{i}.wav", 0.5 * np.sin(2 * np.pi * f0 * t), SR)
        rows.append({"file_name": f"audio/tone{i}.wav", "caption": f"a sine tone at {f0} Hz"})
    (d / "audio" / "silent.wav").write_bytes(b"")
    sf.write(d / "audio" / "zeros.wav", np.zeros(SR), SR)
    rows += [{"file_name": "audio/zeros.wav", "caption": "silence"}, {"file_name": "audio/tone0.wav", "caption": "dup"},
             {"file_name": "audio/missing.wav", "caption": "gone"}]
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


@pytest.mark.slow
def test_autoencoder_encode_fit_generate(folder, tmp_path):
    from musicattr.models.autoencoder_module import AutoencoderModule

    # autoencoder: a real (2-step) Lightning fit, overriding the demo config's model with a tiny one
    run("autoencoder", "--config", "configs/demo/autoencoder.yaml", "--model.model_config", json.dumps(TINY_AE),
        "--data.folder", str(folder), "--data.batch_size", "2", "--trainer.max_steps", "2",
        "--trainer.logger", "false", "--trainer.callbacks.dirpath", str(tmp_path / "ae"),
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.default_root_dir", str(tmp_path / "ae"))
    ae_ckpt = tmp_path / "ae" / "last.ckpt"
    assert ae_ckpt.exists()

    store = tmp_path / "store"
    run("encode", "--config", "configs/demo/encode.yaml", "--model.folder", str(folder), "--model.store",
            str(store), "--model.autoencoder", str(ae_ckpt), "--model.autoencoder_config", "null",
            "--model.max_frames", "16", "--model.shard_size", "2")
    skipped = json.loads((store / "skipped.json").read_text())
    assert skipped["n_skipped"] == 3  # all-silent, duplicate file_name, missing file
    assert {it["file_name"] for it in skipped["items"]} == {"audio/zeros.wav", "audio/tone0.wav", "audio/missing.wav"}
    from musicattr.data.latent_store import LatentStore

    s = LatentStore(store)
    assert len(s) == 6
    item = s[s.position_of("audio/tone2.wav")]
    assert item["latents"].shape == (32, 16) and item["text_emb"].shape == (1, 384)
    assert item["valid_frames"] == int(np.ceil(0.6 * SR / 2048)) and item["seconds_total"] == 1
    # the stored latents are the autoencoder's posterior mean of the zero-padded audio
    ae = AutoencoderModule(TINY_AE)
    ae.load_state_dict(torch.load(ae_ckpt, weights_only=False)["state_dict"])
    audio = torch.zeros(1, 1, 16 * 2048)
    wav, _ = sf.read(folder / "audio" / "tone2.wav", dtype="float32")
    audio[0, 0, : len(wav)] = torch.from_numpy(wav)
    assert torch.allclose(ae.eval().encode_mean(audio)[0], item["latents"], atol=2e-3)
    # a rerun resumes: nothing left to encode
    assert "nothing left to encode" in run("encode", "--config", "configs/demo/encode.yaml", "--model.folder",
                                           str(folder), "--model.store", str(store), "--model.autoencoder",
                                           str(ae_ckpt), "--model.autoencoder_config", "null",
                                           "--model.max_frames", "16").stdout

    fit_dir = tmp_path / "fit"
    run("fit", "--config", "configs/demo/fit.yaml", "--data.store", str(store), "--data.batch_size", "2",
        "--data.val_items", "2", "--trainer.max_steps", "3", "--trainer.logger", "false",
        "--trainer.callbacks.dirpath", str(fit_dir), "--trainer.callbacks.every_n_train_steps", "3",
        "--trainer.default_root_dir", str(fit_dir))
    assert (fit_dir / "last.ckpt").exists()

    out = tmp_path / "gen"
    run("generate", "--checkpoint", str(fit_dir / "last.ckpt"), "--autoencoder", str(ae_ckpt), "--store", str(store),
        "--out_dir", str(out), "--prompts", '["a sine tone at 440 Hz"]', "--durations", "[1.5]", "--steps", "3")
    wav, sr = sf.read(out / "q000.wav")
    assert sr == SR and len(wav) == int(1.5 * SR) and np.isfinite(wav).all()
    from musicattr.data.queries import load_query

    q = load_query(str(out / "q000.query.safetensors"))
    assert q["latents"].shape == (32, 16) and q["valid_frames"] == int(np.ceil(1.5 * SR / 2048))
