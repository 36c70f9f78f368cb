"""``musicattr encode``: audio folder -> latent store, as a Lightning prediction pass.

Each item: the zero-padded audio (as stable-audio-tools pads it) encoded to latents
[C, max_frames] by the autoencoder (posterior mean), its valid length in latent frames
ceil(valid_samples / downsampling_ratio), timing (seconds_start, seconds_total) and the text
embedding of its caption. Ranks write shards as they fill; a rerun skips finished shards.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Subset

from musicattr.data.audio_folder import AudioFolderDataset, scan_audio_folder, write_skip_report
from musicattr.data.datamodules import predict_loader
from musicattr.data.latent_store import LatentStoreWriter
from musicattr.embeddings.text import build_text_encoder
from musicattr.models.autoencoder_module import load_autoencoder
from musicattr.models.sat import file_fingerprint


class EncodeModule(L.LightningModule):
    def __init__(self, folder: str, store: str, autoencoder: str, autoencoder_config: str | None = None,
                 text_encoder: str = "minilm", text_encoder_checkpoint: str | None = None, max_frames: int = 128,
                 batch_size: int = 8, num_workers: int = 0, strict: bool = False, shard_size: int = 256):
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
                         "folder": str(Path(folder).resolve())}

    def setup(self, stage: str) -> None:
        self.rows, bad = scan_audio_folder(self.hparams.folder, self.sample_rate, self.channels, self.max_samples,
                                           self.hparams.strict)
        self.writer = LatentStoreWriter(self.hparams.store, self.manifest if self.trainer.is_global_zero else None)
        if self.trainer.is_global_zero:
            report = write_skip_report(Path(self.hparams.store) / "skipped.json", bad)
            print(f"encode: {len(self.rows)} items to encode, {report['n_skipped']} skipped "
                  f"(see {Path(self.hparams.store) / 'skipped.json'})")
        self.trainer.strategy.barrier()

    def predict_dataloader(self):
        done = self.writer.done_indices()
        data = AudioFolderDataset(self.rows, self.sample_rate, self.channels, self.max_samples)
        todo = [i for i in range(len(data)) if i not in done]
        if not todo and self.trainer.is_global_zero:  # all shards written earlier: the loop will not run
            self.writer.finalize(expected=len(self.rows))
            print(f"encode: nothing left to encode; latent store {self.hparams.store} is complete")
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
        return [LatentStoreCallback(self.hparams.shard_size)]


class LatentStoreCallback(L.Callback):
    """Buffers encoded items and writes a shard every ``shard_size`` items; rank 0 finalizes."""

    def __init__(self, shard_size: int = 256):
        self.shard_size = shard_size
        self._buf: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._buf.append(outputs)
        if sum(len(o["items"]) for o in self._buf) >= self.shard_size:
            self._write(pl_module, trainer.global_rank)

    def _write(self, pl_module, rank: int) -> None:
        if not self._buf:
            return
        items = [it for o in self._buf for it in o["items"]]
        name = f"r{rank}-{items[0]['index']:09d}"
        pl_module.writer.write_shard(name, np.concatenate([o["latents"] for o in self._buf]),
                                     np.concatenate([o["text"] for o in self._buf]), items)
        self._buf = []

    def on_predict_end(self, trainer, pl_module) -> None:
        self._write(pl_module, trainer.global_rank)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            store = pl_module.writer.finalize(expected=len(pl_module.rows))
            print(f"encode: latent store {store.root} holds {len(store)} items")
        trainer.strategy.barrier()
