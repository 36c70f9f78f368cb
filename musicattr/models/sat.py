"""Builders for stable-audio-tools (SAT) models from SAT-format config dicts.

The DiT is SAT's ``ConditionedDiffusionModelWrapper`` around ``DiTWrapper`` /
``DiffusionTransformer``, built with ``create_model_from_config`` exactly as SAT does.
The autoencoder is SAT's ``AudioAutoencoder`` (Oobleck encoder/decoder, VAE bottleneck).

Text conditioning is *pre-encoded*: text embeddings are computed once at encode time and
stored in the latent store, then passed to the DiT as the ``prompt`` cross-attention input.
Timing conditioning (``seconds_start``, ``seconds_total``) uses SAT's ``number`` conditioners.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from typing import Any, Iterator

import torch

TEXT_KEY = "prompt"
TIMING_KEYS = ("seconds_start", "seconds_total")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow what stable-audio-tools prints (the missing flash_attn notice at import, the seed and the
    sampler's progress bar at generation): it is not the user's business and floods the demo's output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


with quiet():  # SAT's transformer prints a flash_attn notice when it is first imported
    import stable_audio_tools.models.transformer  # noqa: F401,E402


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model built from a config."""


def build_diffusion(config: dict[str, Any]):
    """Build SAT's ConditionedDiffusionModelWrapper from a ``diffusion_cond`` config."""
    from stable_audio_tools.models.factory import create_model_from_config

    if config.get("model_type") != "diffusion_cond":
        raise ValueError(f"model_type must be 'diffusion_cond', got {config.get('model_type')!r}")
    check_heads(config)
    cfg = copy.deepcopy(config)
    return create_model_from_config(cfg)


def check_heads(config: dict[str, Any]) -> None:
    """Refuse DiT configs whose cross-attention silently outputs zeros.

    SAT's Attention uses dim // dim_heads query heads and dim_context // dim_heads key/value heads and
    repeats the key/value heads heads // kv_heads times: with more key/value heads than query heads
    (e.g. 384-d unprojected text tokens in a 128-wide DiT) the repeat count is 0 and the text is ignored.
    """
    d = config["model"]["diffusion"]["config"]
    cond = int(d.get("cond_token_dim", 0))
    if cond <= 0:
        return
    width, heads = int(d.get("embed_dim", 768)), int(d.get("num_heads", 8))
    dim_heads = width // heads
    context = width if d.get("project_cond_tokens", True) else cond
    kv_heads = context // dim_heads
    if kv_heads == 0 or kv_heads > heads or heads % kv_heads or context % dim_heads:
        raise ValueError(
            f"DiT config: {kv_heads} key/value heads for {heads} query heads (cond_token_dim {cond}, embed_dim {width}, "
            f"num_heads {heads}, project_cond_tokens {d.get('project_cond_tokens', True)}): SAT's cross-attention would "
            "ignore the text. fix: set project_cond_tokens: true, or make cond_token_dim a divisor-compatible multiple "
            "of embed_dim / num_heads no larger than embed_dim")


def build_autoencoder(config: dict[str, Any]):
    """Build SAT's AudioAutoencoder from an ``autoencoder`` config."""
    from stable_audio_tools.models.factory import create_model_from_config

    if config.get("model_type") != "autoencoder":
        raise ValueError(f"model_type must be 'autoencoder', got {config.get('model_type')!r}")
    return create_model_from_config(copy.deepcopy(config))


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                            prefix: str = "") -> None:
    """Load ``state`` into ``module`` (keys optionally under ``prefix``), or raise a clear error.

    Names the checkpoint file and lists missing, unexpected and shape-mismatched tensors,
    instead of a tensor-shape traceback.
    """
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:5]) + (f" ... (+{len(xs) - 5})" if len(xs) > 5 else "")
        msg = [f"checkpoint {source} does not match the model config:"]
        if shapes:
            msg.append(f"  {len(shapes)} shape mismatches: {head(shapes)}")
        if missing:
            msg.append(f"  {len(missing)} tensors missing from the checkpoint: {head(missing)}")
        if unexpected:
            msg.append(f"  {len(unexpected)} unexpected tensors in the checkpoint: {head(unexpected)}")
        msg.append("  fix: use the config the checkpoint was trained with (see its hyper_parameters), "
                   "or a checkpoint trained with this config.")
        raise CheckpointMismatchError("\n".join(msg))
    module.load_state_dict(state)


def mapped_checkpoint(path: str, map_location: str = "cpu"):
    """``torch.load`` of a checkpoint with its tensors memory-mapped from the file (copy-on-write: nothing is
    written back), so loading a model copies each weight once instead of holding the file's copy beside it (at
    1 B parameters 4 GB less at the load's peak). Files torch cannot map (the legacy format) are read whole."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location=map_location, weights_only=False)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a .ckpt/.pt (Lightning or plain) or .safetensors file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}; fix: check the path or run the stage that writes it")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def init_kwargs(cls, hparams: dict[str, Any]) -> dict[str, Any]:
    """The saved hyper-parameters that ``cls.__init__`` accepts (drops LightningCLI's extras)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in hparams.items() if k in accepted}
