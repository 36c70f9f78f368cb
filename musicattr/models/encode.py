"""``musicattr encode``: audio folder -> latent store, as a Lightning prediction pass.

Each item: the zero-padded audio (as stable-audio-tools pads it) encoded to latents
[C, max_frames] by the autoencoder (posterior mean), its valid length in latent frames
ceil(valid_samples / downsampling_ratio), timing (seconds_start, seconds_total) and the text
embedding of its caption. The ``PartsWriter`` writes each rank's shards as they fill (about
``shard_size`` items); a rerun skips the items of finished shards, and rank 0 writes the index.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Subset

from musicattr.data.audio_folder import AudioFolderDataset, scan_audio_folder, write_skip_report
from musicattr.data.datamodules import pending, predict_loader
from musicattr.data.latent_store import LatentStoreWriter, ShardFormat
from musicattr.embeddings.text import build_text_encoder
from musicattr.models.autoencoder_module import load_autoencoder
from musicattr.fingerprint import file_fingerprint
from musicattr.models.health import record_store_health
from musicattr.parts import Parts, PartsWriter

log = logging.getLogger(__name__)


class EncodeModule(L.LightningModule):
    def __init__(self, folder: str, store: str, autoencoder: str, autoencoder_config: str | None = None,
                 text_encoder: str = "minilm", text_encoder_checkpoint: str | None = None, max_frames: int = 128,
                 batch_size: int = 8, num_workers: int = 0, strict: bool = False, shard_size: int = 256,
                 allow_outside: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.ae = load_autoencoder(autoencoder, autoencoder_config)
        cfg = self.ae.model_config
        self.sample_rate = int(cfg["sample_rate"])
        self.channels = int(cfg.get("audio_channels", cfg["model"]["io_channels"]))
        self.ratio = self.ae.downsampling_ratio
        self.max_samples = max_frames * self.ratio
        self.text = build_text_encoder(text_encoder, text_encoder_checkpoint)
        self.manifest = {"format": 1, "latent_channels": self.ae.latent_dim, "max_frames": max_frames,
                         "sample_rate": self.sample_rate, "audio_channels": self.channels,
                         "downsampling_ratio": self.ratio, "text_encoder": text_encoder, "text_dim": self.text.dim,
                         "autoencoder": str(autoencoder), "autoencoder_fingerprint": file_fingerprint(autoencoder),
                         "autoencoder_config": autoencoder_config, "folder": str(Path(folder).resolve())}

    def setup(self, stage: str) -> None:
        self.rows, bad = scan_audio_folder(self.hparams.folder, self.sample_rate, self.channels, self.max_samples,
                                           self.hparams.strict, self.hparams.allow_outside)
        self.writer = LatentStoreWriter(self.hparams.store, self.manifest if self.trainer.is_global_zero else None)
        if self.trainer.is_global_zero:
            report = write_skip_report(Path(self.hparams.store) / "skipped.json", bad)
            log.info("encode: %d items to encode, %d skipped (see %s)", len(self.rows), report["n_skipped"],
                     Path(self.hparams.store) / "skipped.json")
        self.trainer.strategy.barrier()

    def predict_dataloader(self):
        data = AudioFolderDataset(self.rows, self.sample_rate, self.channels, self.max_samples)
        todo = pending(range(len(data)), self.trainer)
        if not todo:
            log.info("encode: nothing left to encode; latent store %s is complete", self.hparams.store)
        return predict_loader(Subset(data, todo), self.hparams.batch_size, self.hparams.num_workers, self.trainer)

    @torch.no_grad()
    def predict_step(self, batch, batch_idx):
        latents = self.ae.encode_mean(batch["audio"].to(self.device))
        text = self.text.encode(batch["caption"])
        items = []
        for j, i in enumerate(batch["index"].tolist()):
            row = self.rows[i]
            items.append({"index": i, "item_id": batch["item_id"][j], "caption": batch["caption"][j],
                          "file_name": batch["file_name"][j],
                          "valid_frames": math.ceil(int(batch["valid_samples"][j]) / self.ratio),
                          "seconds_start": int(batch["seconds_start"][j]),
                          "seconds_total": int(batch["seconds_total"][j]),
                          "duration_s": float(row["duration_s"])})
        return {"latents": latents.float().cpu().numpy(), "text": text.numpy(), "items": items}

    def configure_callbacks(self):
        parts = Parts(Path(self.hparams.store) / "shards", ShardFormat(self.hparams.store))
        return [PartsWriter(parts, self.merge, max(1, self.hparams.shard_size // self.hparams.batch_size))]

    def merge(self, parts: Parts) -> None:
        store = self.writer.finalize(expected=len(self.rows))
        log.info("encode: latent store %s holds %d items", store.root, len(store))
        record_store_health(store.root, self.hparams.autoencoder)
