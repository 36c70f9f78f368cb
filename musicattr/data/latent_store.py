"""The latent store: encoded training set on disk, sharded and memory-mappable.

Layout of a store directory::

    manifest.json                 what the store was made from (shapes, encoders, checkpoint hash)
    shards/<name>.latents.npy     float16 [n, C, L]  zero-padded audio encoded to latents
    shards/<name>.text.npy        float32 [n, S, D]  text-conditioning embeddings
    shards/<name>.json            the n items of the shard (index, item_id, caption, ...)  (written last)
    index.parquet                 one row per item: index, item_id, caption, file_name, valid_frames,
                                  seconds_start, seconds_total, duration_s, shard, row

A shard is complete once its .json exists (arrays are written first, each atomically), so an
interrupted encode resumes by skipping the indices of complete shards. Reading opens each
shard's arrays with ``np.load(mmap_mode="r")``: 100k+ items never sit in memory at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from musicattr.atomic import atomic_path, atomic_write_text, finished_files

ITEM_COLUMNS = ["index", "item_id", "caption", "file_name", "valid_frames", "seconds_start",
                "seconds_total", "duration_s"]


class StoreError(RuntimeError):
    pass


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


class LatentStoreWriter:
    """Writes shards into a store directory; safe to use from several ranks (distinct names)."""

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any] | None = None):
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        if manifest is not None:
            path = self.root / "manifest.json"
            if path.exists():
                old = json.loads(path.read_text())
                diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
                if diff:
                    raise StoreError(f"{path} was made with other settings {diff} (old, new); fix: encode into "
                                     "a new store directory or delete this one")
            else:
                atomic_write_text(path, json.dumps(manifest, indent=2))

    def write_shard(self, name: str, latents: np.ndarray, text: np.ndarray, items: Sequence[dict]) -> None:
        if not (len(latents) == len(text) == len(items)):
            raise ValueError("latents, text and items must have the same length")
        base = self.root / "shards" / name
        latents, text = latents.astype(np.float16), text.astype(np.float32)
        _atomic_save_npy(base.with_name(name + ".latents.npy"), latents)
        _atomic_save_npy(base.with_name(name + ".text.npy"), text)
        content = hashlib.blake2b(latents.tobytes() + text.tobytes(), digest_size=8).hexdigest()
        atomic_write_text(base.with_name(name + ".json"), json.dumps({"items": list(items), "content": content}))

    def shard_metas(self) -> dict[str, list[dict]]:
        return {p.name[:-5]: json.loads(p.read_text())["items"]
                for p in finished_files((self.root / "shards").glob("*.json"))}

    def done_indices(self) -> set[int]:
        return {int(it["index"]) for items in self.shard_metas().values() for it in items}

    def finalize(self, expected: int | None = None) -> "LatentStore":
        """Write index.parquet over all complete shards (each index once) and open the store."""
        import pandas as pd

        rows, seen = [], set()
        for shard, items in self.shard_metas().items():
            for row, it in enumerate(items):
                if it["index"] in seen:
                    continue
                seen.add(it["index"])
                rows.append({**{k: it.get(k) for k in ITEM_COLUMNS}, "shard": shard, "row": row})
        if expected is not None and len(rows) != expected:
            raise StoreError(f"{self.root}: {len(rows)} of {expected} items encoded; fix: rerun encode to resume")
        df = pd.DataFrame(rows, columns=ITEM_COLUMNS + ["shard", "row"]).sort_values("index")
        with atomic_path(self.root / "index.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        return LatentStore(self.root)


class ShardFormat:
    """Shards of the store as the parts of ``musicattr encode`` (``musicattr.parts``): a prediction holds
    ``latents`` [B, C, L], ``text`` [B, S, D] and ``items`` (B dicts with ``index``); a part is a shard
    ``r<rank>-<first index>``, complete once its .json is written."""

    pattern = "*.json"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def add(self, buffer: list | None, prediction: dict) -> list:
        return [*(buffer or []), prediction]

    def size(self, buffer: list) -> int:
        return sum(len(o["items"]) for o in buffer)

    def write(self, folder: Path, rank: int, buffer: list) -> Path:
        items = [it for o in buffer for it in o["items"]]
        name = f"r{rank}-{items[0]['index']:09d}"
        LatentStoreWriter(self.root).write_shard(name, np.concatenate([o["latents"] for o in buffer]),
                                                 np.concatenate([o["text"] for o in buffer]), items)
        return folder / f"{name}.json"

    def indices(self, path: Path) -> list[int]:
        return [int(it["index"]) for it in json.loads(path.read_text())["items"]]


class LatentStore(torch.utils.data.Dataset):
    """Read side: ``store[i]`` is a dict of tensors and metadata for the item at position i."""

    def __init__(self, root: str | os.PathLike):
        import pandas as pd

        self.root = Path(root)
        index = self.root / "index.parquet"
        if not index.exists():
            raise StoreError(f"{index} not found: {self.root} is not a finished latent store; "
                             "fix: run `musicattr encode` (it resumes) or check the path")
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.items = pd.read_parquet(index).reset_index(drop=True)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def fingerprint(self) -> str:
        """A short hash of what the store holds: its manifest, index and shard records (items and a hash of
        each shard's arrays), so a store re-encoded at the same path gets another fingerprint."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.blake2b(digest_size=8)
            for p in [self.root / "manifest.json", self.root / "index.parquet",
                      *finished_files((self.root / "shards").glob("*.json"))]:
                h.update(p.name.encode() + b"\0" + p.read_bytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def latent_shape(self) -> tuple[int, int]:
        return int(self.manifest["latent_channels"]), int(self.manifest["max_frames"])

    def _shard(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._arrays:
            base = self.root / "shards" / name
            self._arrays[name] = (np.load(str(base) + ".latents.npy", mmap_mode="r"),
                                  np.load(str(base) + ".text.npy", mmap_mode="r"))
        return self._arrays[name]

    def position_of(self, item: int | str) -> int:
        """Position of an item given its integer index or its item_id."""
        col = "index" if isinstance(item, (int, np.integer)) else "item_id"
        hit = np.flatnonzero(self.items[col].to_numpy() == item)
        if len(hit) == 0:
            raise KeyError(f"item {item!r} is not in the store {self.root}")
        return int(hit[0])

    def resolve(self, key: str) -> int:
        """Position of the item named by ``key``: its item_id, or ``index:N`` / a bare number N for its index.

        An item_id always wins over a number; a digit-only key that is the item_id of one item and the
        index of another is refused as ambiguous."""
        key = str(key)
        if key.startswith("index:") and key[6:].isdigit():
            return self.position_of(int(key[6:]))
        by_id = np.flatnonzero(self.items["item_id"].astype(str).to_numpy() == key)
        by_index = np.flatnonzero(self.items["index"].to_numpy() == int(key)) if key.isdigit() else []
        if len(by_id) and len(by_index) and by_id[0] != by_index[0]:
            raise ValueError(f"{key!r} is the item_id of one item and the index of another in {self.root}; fix: "
                             f"pass the item_id, or 'index:{key}' for the item with that index")
        if len(by_id):
            return int(by_id[0])
        if len(by_index):
            return int(by_index[0])
        raise KeyError(f"no item with item_id or index {key!r} in the store {self.root}")

    def __getitem__(self, pos: int) -> dict[str, Any]:
        r = self.items.iloc[pos]
        lat, txt = self._shard(r["shard"])
        return {
            "latents": torch.from_numpy(np.array(lat[int(r["row"])], dtype=np.float32)),
            "text_emb": torch.from_numpy(np.array(txt[int(r["row"])], dtype=np.float32)),
            "valid_frames": int(r["valid_frames"]),
            "seconds_start": float(r["seconds_start"]),
            "seconds_total": float(r["seconds_total"]),
            "index": int(r["index"]),
            "item_id": str(r["item_id"]),
            "caption": str(r["caption"]),
        }
