"""``musicattr generate``: prompts + durations -> audio files and query latents z_hat.

Sampling uses stable-audio-tools' ``generate_diffusion_cond`` (k-diffusion samplers) with
precomputed conditioning tensors: the prompt's text embedding and the timing conditions
(seconds_start = 0, seconds_total = ceil(duration)). The full-length latent is kept as the
query (its first ceil(duration * sr / ratio) frames are the valid part), decoded by the
autoencoder and cropped to the duration.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import soundfile as sf
import torch
from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.data.queries import save_query
from musicattr.models.sat import TEXT_KEY, quiet

log = logging.getLogger(__name__)


def sample_latents(module, text_emb: torch.Tensor, seconds_total: float, max_frames: int, steps: int = 50,
                   cfg_scale: float = 5.0, seed: int = 0, sampler_type: str = "dpmpp-2m-sde") -> torch.Tensor:
    """One latent [1, C, max_frames] from SAT's sampler, conditioned on a text embedding [1, S, D] and timing."""
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    device = module.device
    with torch.no_grad(), quiet():
        tensors = module.diffusion.conditioner([{"seconds_start": 0.0, "seconds_total": float(seconds_total)}], device)
        tensors[TEXT_KEY] = [text_emb.to(device), torch.ones(text_emb.shape[:2], device=device)]
        return generate_diffusion_cond(module.diffusion, steps=steps, cfg_scale=cfg_scale, conditioning_tensors=tensors,
                                       sample_size=max_frames, seed=seed, device=device, return_latents=True,
                                       sampler_type=sampler_type).float()



def write_generation(path: str | Path, audio: torch.Tensor, sample_rate: int) -> None:
    """Write a generation [C, T] as a wav file, atomically, peak-normalised to 0.9 (a generation's level is
    arbitrary)."""
    with atomic_path(path) as tmp:
        sf.write(tmp, (audio / max(float(audio.abs().max()), 1e-6) * 0.9).numpy().T, sample_rate)

def generate(checkpoint: str, autoencoder: str, out_dir: str, prompts: list[str], durations: list[float] | None = None,
             max_frames: int | None = None, text_encoder: str = "minilm", text_encoder_checkpoint: str | None = None,
             autoencoder_config: str | None = None, steps: int = 50, cfg_scale: float = 5.0, seed: int = 0,
             sampler_type: str = "dpmpp-2m-sde", device: str = "cpu", store: str | None = None,
             first_id: int = 0) -> list[dict]:
    """Generate one track per prompt; write ``<out_dir>/<name>.wav`` and ``<name>.query.safetensors``.

    Args:
        checkpoint: DiT checkpoint (theta0) from ``musicattr fit``.
        autoencoder: autoencoder checkpoint used to build the latent store.
        prompts / durations: one duration in seconds per prompt (default: the model's maximum length).
        max_frames: latent length; default the latent store's (``store``) or the checkpoint's.
        first_id: the number of the first query: prompt j is ``q{first_id + j:03d}``, sampled with seed
            ``seed + first_id + j`` (a later batch of queries continues the numbering and the seeds).
    """
    from musicattr.embeddings.text import build_text_encoder
    from musicattr.models.autoencoder_module import load_autoencoder
    from musicattr.models.diffusion_module import load_diffusion_module

    if not prompts:
        raise ValueError("no prompts given; fix: pass --prompts '[\"a slow chorale on strings\"]'")
    module = load_diffusion_module(checkpoint).to(device)
    ae = load_autoencoder(autoencoder, autoencoder_config).to(device)
    if store is not None:
        manifest = json.loads((Path(store) / "manifest.json").read_text())
        max_frames = max_frames or int(manifest["max_frames"])
        text_encoder = manifest.get("text_encoder", text_encoder)
    max_frames = max_frames or int(module.model_config.get("sample_size", 0)) // ae.downsampling_ratio
    if not max_frames:
        raise ValueError("unknown latent length; fix: pass max_frames or store")
    sr, ratio = module.sample_rate, ae.downsampling_ratio
    durations = list(durations or [max_frames * ratio / sr] * len(prompts))
    if len(durations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(durations)} durations; fix: give one duration per prompt")
    text = build_text_encoder(text_encoder, text_encoder_checkpoint, device=device).encode(prompts).to(device)
    model_dim = int(module.model_config["model"]["diffusion"]["config"].get("cond_token_dim", 0))
    if model_dim and text.shape[-1] != model_dim:
        raise ValueError(f"text encoder {text_encoder!r} gives {text.shape[-1]}-d embeddings but the DiT in {checkpoint} "
                         f"expects {model_dim}-d; fix: use the text encoder the latent store was encoded with")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for q, (prompt, dur) in enumerate(zip(prompts, durations)):
        dur = min(float(dur), max_frames * ratio / sr)
        name = f"q{first_id + q:03d}"
        latents = sample_latents(module, text[q:q + 1], math.ceil(dur), max_frames, steps, cfg_scale, seed + first_id + q,
                                 sampler_type)
        audio = ae.decode(latents)[0, :, : int(dur * sr)].cpu()
        write_generation(out / f"{name}.wav", audio, sr)
        valid = math.ceil(dur * sr / ratio)
        info = {"query_id": name, "caption": prompt, "duration_s": dur, "seconds_start": 0.0,
                "seconds_total": float(math.ceil(dur)), "valid_frames": valid, "seed": seed + first_id + q,
                "audio": f"{name}.wav", "checkpoint": checkpoint}
        save_query(out / f"{name}.query.safetensors", latents[0], text[q], info)
        results.append(info)
        log.info("generate: %s  (%.1f s)  %s", out / (name + ".wav"), dur, prompt)
    atomic_write_json(out / "queries.json", results)
    return results
