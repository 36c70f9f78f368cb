"""Random audio crops of an audio folder, for autoencoder training (``musicattr autoencoder``)."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from musicattr.data.audio_folder import AudioFolderDataset


class AudioCropDataModule(L.LightningDataModule):
    def __init__(self, folder: str, sample_rate: int = 16000, channels: int = 1, crop_seconds: float = 1.0,
                 batch_size: int = 8, num_workers: int = 0, strict: bool = False):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        crop = int(h.crop_seconds * h.sample_rate)
        self.train_set = AudioFolderDataset.from_folder(h.folder, h.sample_rate, h.channels, crop,
                                                        strict=h.strict, crop_samples=crop)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)
