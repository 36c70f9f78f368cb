"""Ship a trained autoencoder as a small, self-describing folder (the demo's ``assets/demo_autoencoder``).

    <out>/weights.safetensors   the autoencoder's weights (SAT AudioAutoencoder state dict)
    <out>/config.json           its SAT model config (with the log-mel ``spectrogram`` front end)
    <out>/health.json           reconstruction health on the held-back tracks (see models/health.py)
    <out>/recipe.json           how it was trained: the training config, steps, and the fingerprint of
                                the audio folder it was trained on

``encode --model.autoencoder <out>/weights.safetensors --model.autoencoder_config <out>/config.json``
uses it; ``encode`` finds ``health.json`` beside the weights and copies it into the store's manifest.

Usage: ``python -m musicattr.models.autoencoder_export CHECKPOINT OUT_DIR --folder AUDIO_FOLDER``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from musicattr.atomic import atomic_path, atomic_write_text
from musicattr.models.health import HEALTH_FILE


def folder_fingerprint(folder: str | Path) -> str:
    """blake2b over the metadata file and every audio file of an audio folder, in sorted order."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=8)
    meta = next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).exists()), None)
    if meta is None:
        raise FileNotFoundError(f"{folder} has no metadata.jsonl or metadata.csv; fix: give the audio folder "
                                "the autoencoder was trained on")
    files = [meta] + sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def export_autoencoder(checkpoint: str, out_dir: str, folder: str, config: str | None = None) -> Path:
    """Write the folder described above from a ``musicattr autoencoder`` checkpoint; ``config``: the training
    config file it was trained with (recorded verbatim in the recipe)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters", {})
    if "model_config" not in hp:
        raise ValueError(f"{checkpoint} has no hyper_parameters.model_config; fix: pass a checkpoint written by "
                         "`musicattr autoencoder`")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k[len("autoencoder."):]: v.contiguous() for k, v in ckpt["state_dict"].items()
               if k.startswith("autoencoder.")}
    with atomic_path(out / "weights.safetensors") as tmp:
        save_file(weights, str(tmp))
        tmp.chmod(0o644)
    atomic_write_text(out / "config.json", json.dumps(hp["model_config"], indent=2))
    health = Path(checkpoint).with_name(HEALTH_FILE)
    if health.exists():
        shutil.copyfile(health, out / HEALTH_FILE)
    recipe = {"checkpoint": Path(checkpoint).name, "global_step": int(ckpt.get("global_step", -1)),
              "hyper_parameters": {k: v for k, v in hp.items() if k not in ("model_config", "_instantiator")},
              "training_config_file": config, "training_config": Path(config).read_text() if config else None,
              "audio_folder": str(folder), "audio_folder_fingerprint": folder_fingerprint(folder)}
    atomic_write_text(out / "recipe.json", json.dumps(recipe, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--folder", required=True, help="the audio folder the autoencoder was trained on")
    p.add_argument("--config", help="the training config file (recorded in the recipe)")
    a = p.parse_args()
    print(export_autoencoder(a.checkpoint, a.out_dir, a.folder, a.config))


if __name__ == "__main__":
    main()
