"""Random audio crops of an audio folder, for autoencoder training (``musicattr autoencoder``).

``held_back`` tracks (every k-th track with a caption of its own, so no copy of it is trained on)
are left out of training and kept whole for the representation health check at the end of training.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from musicattr.data.audio_folder import AudioFolderDataset, read_audio, scan_audio_folder


def split_held_back(rows: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """(training rows, up to ``n`` held-back rows), evenly spread over the rows whose caption is unique; never
    more than a quarter of the rows, so a small folder still trains on most of its tracks."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["caption"]] = counts.get(r["caption"], 0) + 1
    unique = [i for i, r in enumerate(rows) if counts[r["caption"]] == 1]
    n = min(n, len(rows) // 4)
    step = max(1, len(unique) // max(n, 1))
    held = set(unique[::step][:n]) if n > 0 else set()
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


class AudioCropDataModule(L.LightningDataModule):
    def __init__(self, folder: str, sample_rate: int = 16000, channels: int = 1, crop_seconds: float = 1.0,
                 batch_size: int = 8, num_workers: int = 0, strict: bool = False, held_back: int = 16,
                 max_seconds: float = 16.384, allow_outside: bool = False):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        crop = int(h.crop_seconds * h.sample_rate)
        rows, _ = scan_audio_folder(h.folder, h.sample_rate, h.channels, crop, h.strict, h.allow_outside)
        train, self.held_back_rows = split_held_back(rows, h.held_back)
        if not train:
            raise ValueError(f"{h.folder}: no usable audio to train the autoencoder on; fix: check the folder's "
                             "metadata and audio (see the skipped files above)")
        self.train_set = AudioFolderDataset(train, h.sample_rate, h.channels, crop, crop_samples=crop)

    def held_back_tracks(self) -> list[torch.Tensor]:
        """The held-back tracks, whole (up to ``max_seconds``), as [C, T] tensors."""
        limit = int(self.hparams.max_seconds * self.hparams.sample_rate)
        return [read_audio(r["path"], self.hparams.sample_rate, self.hparams.channels, r["file_name"])[:, :limit]
                for r in self.held_back_rows]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)
