"""Lightning data modules over the latent store (training, and prediction passes), and a padding-free
distributed sampler."""
from __future__ import annotations

from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from musicattr.data.latent_store import LatentStore


def collate_items(items: list[dict]) -> dict:
    """Stack tensors and numbers; keep strings as lists."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if torch.is_tensor(vals[0]):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def item_slice(batch: dict, j: int) -> dict:
    """Item ``j`` of a collated batch, as a batch of one (tensors and lists sliced, the rest kept)."""
    return {k: (v[j:j + 1] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}


class ShardSampler(Sampler[int]):
    """Rank r takes positions r, r+W, r+2W, ... of the dataset: each item on exactly one rank,
    with no padding duplicates (unlike DistributedSampler). Fine for prediction loops, which need
    no per-step collective."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def predict_loader(dataset, batch_size: int, num_workers: int, trainer) -> DataLoader:
    """Loader for a prediction pass, sharded over the trainer's ranks without duplicates.
    Use with ``Trainer(use_distributed_sampler=False)``."""
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world, rank),
                      num_workers=num_workers, collate_fn=collate_items,
                      persistent_workers=False)


def pending(indices, trainer) -> list[int]:
    """Positions whose item index no PartsWriter of ``trainer`` has written yet (what a resumed pass does)."""
    from musicattr.parts import written_indices

    done = written_indices(trainer)
    return [pos for pos, i in enumerate(indices) if int(i) not in done]


class StorePredictDataModule(L.LightningDataModule):
    """The latent store in a prediction pass (``fisher``, ``attribute``; the options under ``data:``).

    Each rank takes a disjoint slice (``ShardSampler``) of the items that the pass's ``PartsWriter`` has
    not written yet, so a killed pass resumes where it stopped. Run with ``use_distributed_sampler=False``."""

    def __init__(self, store: str, batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        self.store = LatentStore(self.hparams.store)

    def predict_dataloader(self) -> DataLoader:
        todo = pending(self.store.items["index"], self.trainer)
        return predict_loader(Subset(self.store, todo), self.hparams.batch_size, self.hparams.num_workers,
                              self.trainer)


def read_item_ids(exclude: str | list[str] | None) -> list[str]:
    """Item ids from a list, or from a file: one id a line (blank lines skipped), or a JSON list."""
    import json
    import os

    if exclude is None:
        return []
    if isinstance(exclude, str):
        if not os.path.isfile(exclude):
            raise FileNotFoundError(f"exclude file {exclude!r} not found; fix: give the path of a file with one item "
                                    "id a line (e.g. a retrain's removed.txt), or a list of ids")
        text = open(exclude, encoding="utf-8").read()
        return [str(i) for i in json.loads(text)] if text.lstrip().startswith("[") else \
            [line.strip() for line in text.splitlines() if line.strip()]
    return [str(i) for i in exclude]


def kept_positions(store: LatentStore, exclude: str | list[str] | None) -> list[int]:
    """Positions of the store's items whose item_id is not in ``exclude`` (ids, or a file of ids).
    An id the store does not hold is refused: a typo would otherwise silently train on everything."""
    removed = set(read_item_ids(exclude))
    ids = store.items["item_id"].astype(str)
    unknown = sorted(removed - set(ids))
    if unknown:
        raise KeyError(f"{len(unknown)} excluded item ids are not in the store {store.root}, e.g. {unknown[:3]}; "
                       "fix: exclude item ids of this store (the item_id column of its index.parquet)")
    return [i for i, item in enumerate(ids) if item not in removed]


class LatentDataModule(L.LightningDataModule):
    """Training/validation split of a latent store for ``musicattr fit``.

    The validation set is every ``val_every``-th item (deterministic); ``val_every=0`` trains on all
    items and validates on the first ``val_batches`` batches of the training set.
    ``exclude`` (item ids, or a file of them) leaves items out of both sets: the store is filtered by
    id, nothing is re-encoded (the retrains of ``musicattr counterfactual``).
    """

    def __init__(self, store: str, batch_size: int = 16, num_workers: int = 0, val_every: int = 0,
                 val_items: int = 32, exclude: str | list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.store_path = store

    def setup(self, stage: str | None = None) -> None:
        self.store = LatentStore(self.store_path)
        kept = kept_positions(self.store, self.hparams.exclude)
        k = self.hparams.val_every
        if k:
            val = [p for j, p in enumerate(kept) if j % k == 0]
            train = [p for j, p in enumerate(kept) if j % k]
        else:
            train, val = kept, kept[:self.hparams.val_items]
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(train) // world < self.hparams.batch_size:
            raise ValueError(f"{len(train)} training items left in {self.store_path} for {world} process(es) with "
                             f"batch size {self.hparams.batch_size} (incomplete batches are dropped): no training "
                             "batch; fix: exclude fewer items, or lower data.batch_size or the number of devices")
        self.train_set, self.val_set = Subset(self.store, train), Subset(self.store, val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, collate_fn=collate_items,
                          persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          collate_fn=collate_items)
