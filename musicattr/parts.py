"""One resumable writer for every prediction pass (encode, fisher, attribute, and the index to come).

Each rank turns the outputs of ``predict_step`` into *parts*: files written atomically every
``flush_every`` batches, each recording the item indices it covers. A killed run resumes by skipping
the items of the parts already written (the data module asks :func:`written_indices`); at the end of
the pass every rank flushes, and rank 0 merges the parts into the stage's output.

    Parts(folder, format, key)      the parts of one run: a key file (``run.json``) says what they were
                                    computed from; parts of another run are refused or, with
                                    ``overwrite``, deleted
    PartsWriter(parts, merge)       the Lightning prediction writer: buffer -> parts -> merge(parts)
    TableFormat()                   rows (a dict of equal-length columns with ``index``) -> Parquet
    TensorFormat("cat" | "sum")     tensors with ``index`` -> safetensors: rows [B, ...] concatenated,
                                    or sums over the items (a Fisher)

A format has ``add(buffer, prediction)``, ``size(buffer)``, ``write(folder, rank, buffer)`` and
``indices(path)``; the latent store's shards are one more (``musicattr.data.latent_store.ShardFormat``).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from musicattr.atomic import atomic_path, atomic_write_json, finished_files


class RunMismatchError(RuntimeError):
    """A run folder holds the results of a run with other settings."""


def _part_name(rank: int, suffix: str) -> str:
    return f"part-r{rank}-{uuid.uuid4().hex[:12]}{suffix}"


class TableFormat:
    """Rows as Parquet: each prediction is a dict of equal-length columns, one of them ``index``."""

    pattern = "part-*.parquet"

    def add(self, buffer: list | None, prediction: Mapping[str, Sequence]) -> list:
        return [*(buffer or []), dict(prediction)]

    def size(self, buffer: list) -> int:
        return sum(len(p["index"]) for p in buffer)

    def write(self, folder: Path, rank: int, buffer: list) -> Path:
        import pandas as pd

        path = folder / _part_name(rank, ".parquet")
        with atomic_path(path) as tmp:
            pd.concat([pd.DataFrame(p) for p in buffer], ignore_index=True).to_parquet(tmp, index=False)
        return path

    def indices(self, path: Path) -> list[int]:
        import pandas as pd

        return [int(i) for i in pd.read_parquet(path, columns=["index"])["index"]]

    def read(self, paths: Sequence[Path]) -> "pd.DataFrame":
        """All rows of the parts (duplicates of an index, from a rerun, dropped)."""
        import pandas as pd

        frames = [pd.read_parquet(p) for p in paths]
        if not frames:
            return pd.DataFrame({"index": pd.Series([], dtype="int64")})
        return pd.concat(frames, ignore_index=True).drop_duplicates("index", keep="first")


class TensorFormat:
    """Tensors as safetensors, with the item indices in the metadata.

    ``reduce="cat"``: each prediction holds ``index`` (B ints) and tensors [B, ...] (one row per item:
    per-item projected gradients); a part is their concatenation. ``reduce="sum"``: the tensors are sums
    over the prediction's items (squared gradients); a part holds the float64 sum over its items."""

    pattern = "part-*.safetensors"

    def __init__(self, reduce: str = "cat"):
        if reduce not in ("cat", "sum"):
            raise ValueError(f"reduce {reduce!r}: choose 'cat' or 'sum'")
        self.reduce = reduce

    def add(self, buffer: dict | None, prediction: Mapping[str, Any]) -> dict:
        index = [int(i) for i in prediction["index"]]
        tensors = {k: v.detach().cpu() for k, v in prediction.items() if k != "index"}
        if buffer is None:
            return {"index": index, "tensors": {k: [v] if self.reduce == "cat" else v.double()
                                                for k, v in tensors.items()}}
        buffer["index"] += index
        for k, v in tensors.items():
            if self.reduce == "cat":
                buffer["tensors"][k].append(v)
            else:
                buffer["tensors"][k] += v.double()
        return buffer

    def size(self, buffer: dict) -> int:
        return len(buffer["index"])

    def write(self, folder: Path, rank: int, buffer: dict) -> Path:
        from musicattr.tensor_file import save_tensors

        tensors = {k: (torch.cat(v) if self.reduce == "cat" else v) for k, v in buffer["tensors"].items()}
        path = folder / _part_name(rank, ".safetensors")
        with atomic_path(path) as tmp:   # streamed: a Fisher part is 8 B per parameter, never copied whole
            save_tensors(tensors, tmp, metadata={"indices": json.dumps(buffer["index"]), "reduce": self.reduce})
        return path

    def indices(self, path: Path) -> list[int]:
        from musicattr.tensor_file import read_metadata

        return json.loads(read_metadata(path)["indices"])   # the header alone


class Parts:
    """The part files of one run in ``folder``, and the key of that run (a dict, or a callable giving it).

    ``key`` holds everything the parts depend on; :meth:`claim` records it in ``folder/run.json``.
    ``mismatch`` is the error raised when the folder holds parts of a run with another key."""

    def __init__(self, folder: str | Path, format, key: dict | Callable[[], dict] | None = None,
                 mismatch: Exception | None = None):
        self.folder, self.format, self._key = Path(folder), format, key
        self.mismatch = mismatch or RunMismatchError(
            f"{self.folder} holds results of a run with other settings; fix: choose another output, or pass "
            "--model.overwrite true to replace them")

    def key(self) -> dict | None:
        key = self._key() if callable(self._key) else self._key
        return None if key is None else json.loads(json.dumps(key))

    def claim(self, overwrite: bool = False) -> None:
        """Record the key before parts are written. Parts of another run are refused, or deleted with
        ``overwrite``; parts of this run are kept for resuming."""
        key, key_file = self.key(), self.folder / "run.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        if key is None:
            return
        if key_file.exists() and json.loads(key_file.read_text()) != key:
            if not overwrite:
                raise self.mismatch
            for p in self.files():
                p.unlink()
        atomic_write_json(key_file, key)

    def files(self) -> list[Path]:
        return finished_files(self.folder.glob(self.format.pattern))  # a killed write's temporary is not a part

    def done(self) -> set[int]:
        """Indices of the items some part already holds."""
        return {i for p in self.files() for i in self.format.indices(p)}

    def write(self, rank: int, buffer) -> Path:
        return self.format.write(self.folder, rank, buffer)


class PartsWriter(BasePredictionWriter):
    """Writes each rank's predictions as parts every ``flush_every`` batches; at the end of the pass
    rank 0 calls ``merge(parts)`` (also when every item was written by earlier runs and nothing ran).

    Predictions are not kept by the Trainer (``return_predictions`` is turned off): the parts hold them.
    A ``predict_step`` returning None writes nothing."""

    def __init__(self, parts: Parts, merge: Callable[[Parts], Any] | None = None, flush_every: int = 10,
                 overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.parts, self.merge, self.flush_every, self.overwrite = parts, merge, max(1, flush_every), overwrite
        self._buffer, self._batches = None, 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        trainer.predict_loop.return_predictions = False
        if trainer.is_global_zero:
            self.parts.claim(self.overwrite)
        trainer.strategy.barrier()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if prediction is None:
            return
        self._buffer = self.parts.format.add(self._buffer, prediction)
        self._batches += 1
        if self._batches % self.flush_every == 0:
            self.flush(trainer.global_rank)

    def flush(self, rank: int) -> None:
        if self._buffer is not None and self.parts.format.size(self._buffer):
            self.parts.write(rank, self._buffer)
        self._buffer = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """End of a successful pass (Lightning skips teardown hooks after an exception): flush, then merge."""
        if stage != "predict":
            return
        self.flush(trainer.global_rank)
        trainer.strategy.barrier()
        if trainer.is_global_zero and self.merge is not None:
            self.merge(self.parts)
        trainer.strategy.barrier()


def written_indices(trainer) -> set[int]:
    """Indices already held by the parts of every PartsWriter of ``trainer`` (the items to skip)."""
    done: set[int] = set()
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, PartsWriter):
            done |= cb.parts.done()
    return done
