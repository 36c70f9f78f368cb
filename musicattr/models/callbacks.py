"""Training callbacks: audio samples for the wandb dashboard."""
from __future__ import annotations

import math

import lightning as L


class AudioSamplesCallback(L.Callback):
    """At the end of training, generate from the first validation captions and log the audio
    (with the caption) to the WandbLogger, next to the decoded training track it was captioned from."""

    def __init__(self, autoencoder: str, autoencoder_config: str | None = None, num_samples: int = 2, steps: int = 25,
                 cfg_scale: float = 5.0, seed: int = 0):
        self.autoencoder, self.autoencoder_config = autoencoder, autoencoder_config
        self.num_samples, self.steps, self.cfg_scale, self.seed = num_samples, steps, cfg_scale, seed

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        import wandb

        from musicattr.models.autoencoder_module import load_autoencoder
        from musicattr.models.generate import sample_latents

        ae = load_autoencoder(self.autoencoder, self.autoencoder_config).to(pl_module.device)
        data = trainer.datamodule.val_set
        sr, rows = pl_module.sample_rate, []
        pl_module.eval()
        for i in range(min(self.num_samples, len(data))):
            item = data[i]
            n = math.ceil(item["seconds_total"] * sr)
            z = sample_latents(pl_module, item["text_emb"][None], item["seconds_total"], item["latents"].shape[-1],
                               self.steps, self.cfg_scale, self.seed + i)
            gen = ae.decode(z)[0, 0, :n].cpu().numpy()
            ref = ae.decode(item["latents"][None].to(pl_module.device))[0, 0, :n].cpu().numpy()
            rows.append([item["caption"], wandb.Audio(gen, sample_rate=sr), wandb.Audio(ref, sample_rate=sr)])
        loggers[0].log_table("samples", columns=["caption", "generated", "training track (decoded)"], data=rows)
