"""How the attribution index stores its rows P phi_i, and how it reads them out of core.

Precisions (``musicattr index --model.precision``, recorded in ``index.json``; an index without the entry is
float32, the format before it existed):

    float32   phi_i as it is                                                     4 k bytes per item
    float16   phi_i / c_i in float16, c_i = max_j |phi_ij| (per row, float32)   2 k + 4
    int8      round(phi_i / c_i) in [-127, 127], c_i = max_j |phi_ij| / 127     k + 4

The row scale c_i keeps float16 clear of overflow and underflow whatever the magnitude of phi. The error of
a score tau^_i = <phi_i, psi> is then bounded per row by (rounding to nearest)

    float16   |tau^16 - tau^| <= 2^-11 <|phi_i|, |psi|> + 2^-25 c_i ||psi||_1   (2^-25: float16's subnormals)
    int8      |tau^8 - tau^|  <= c_i / 2 ||psi||_1 = max|phi_i| ||psi||_1 / 254

(and typically c_i ||psi||_2 / sqrt(12) for int8: the roundings are independent, uniform in +-c_i / 2).

Reading: a shard is a safetensors file (an 8-byte little-endian header length, a JSON header, the tensors'
bytes); ``ShardReader`` maps its tensors with ``numpy.memmap``, so a query streams the N x k rows in blocks
of about ``BLOCK_BYTES`` and never holds more than one block. ``TopK`` keeps a running exact top-m per query
over the blocks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

INDEX_FILE, ITEMS_FILE, SHARDS = "index.json", "items.parquet", "shards"  # the index folder' layout
PRECISIONS = {"float32": 4, "float16": 2, "int8": 1}  # bytes per stored number
PHI, SCALE = "phi", "phi_scale"
BLOCK_BYTES = 1 << 26  # 64 MiB of float32 per streamed block
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I8": np.int8, "I32": np.int32,
           "I64": np.int64, "U8": np.uint8, "BF16": None}


def check_precision(precision: str, where: str = "--model.precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"index precision {precision!r} (from {where}) is not known; fix: choose one of "
                         f"{', '.join(PRECISIONS)}")
    return precision


def bytes_per_item(k: int, precision: str = "float32") -> int:
    """Bytes of one item in the shards: the row, its scale (float16, int8) and s_i, L_i (float64)."""
    return PRECISIONS[precision] * k + (4 if precision != "float32" else 0) + 16


def encode(phi: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """The stored tensors of rows ``phi`` [n, k] (any float dtype): {'phi'} or {'phi', 'phi_scale' [n]}."""
    check_precision(precision)
    if precision == "float32":
        return {PHI: phi.float()}
    x = phi if phi.dtype == torch.float64 else phi.float()  # float32 rows stay float32 (one pass each)
    low, high = torch.aminmax(x, dim=1)
    peak = torch.maximum(high, -low)  # max_j |x_ij| in one pass
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    if precision == "float16":
        return {PHI: (x / peak[:, None]).half(), SCALE: peak.float()}
    scale = (peak / 127).float()
    y = x / scale.to(x.dtype)[:, None]
    return {PHI: y.round_().clamp_(-127, 127).to(torch.int8), SCALE: scale}


def decode(rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """float32 rows [n, k] from the stored ``rows`` and their row scales (None: float32 as stored)."""
    out = np.asarray(rows, dtype=np.float32)
    return out if scale is None else out * np.asarray(scale, dtype=np.float32)[:, None]


def error_bound(phi: np.ndarray, psi: np.ndarray, precision: str) -> np.ndarray:
    """The per-row bound above on |tau^(precision) - tau^(float32)| for rows ``phi`` [n, k], psi [k, Q]."""
    a, p = np.abs(phi).astype(np.float64), np.abs(psi).astype(np.float64)
    peak = a.max(1, keepdims=True)
    if precision == "float32":
        return np.zeros((len(phi), p.shape[1]))
    if precision == "float16":
        return 2.0 ** -11 * (a @ p) + 2.0 ** -25 * peak * p.sum(0)
    return peak / 254 * p.sum(0)


def fold_rows(x: np.ndarray, k: int | None) -> np.ndarray:
    """The sign sketch at a divisor ``k`` of the rows' K (``sketch.fold``): x'[:, b] = sum_m x[:, b + m k]."""
    big = x.shape[-1]
    if k is None or k == big:
        return x
    if big % k:
        raise ValueError(f"cannot fold a sketch of k = {big} to k = {k}: {k} does not divide {big}")
    return x.reshape(x.shape[0], big // k, k).sum(1)


class ShardReader:
    """The tensors of one safetensors shard as read-only ``numpy.memmap`` arrays (nothing read until used)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path} is not a readable safetensors shard of an index ({e}); fix: rebuild the "
                             "index with `musicattr index --model.overwrite true`") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.header, self.offset = header, 8 + n

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def array(self, name: str) -> np.ndarray:
        if name not in self.header:
            raise KeyError(f"{self.path} has no tensor {name!r} (it has {sorted(self.header)}); fix: rebuild the "
                           "index with `musicattr index --model.overwrite true`")
        h = self.header[name]
        dtype = _DTYPES.get(h["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {h['dtype']}, which an index does not store")
        start, stop = h["data_offsets"]
        shape = tuple(h["shape"])
        if stop == start:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset + start, shape=shape)

    def rows(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(stored phi [n, k], its row scales [n] or None)."""
        return self.array(PHI), (self.array(SCALE) if SCALE in self else None)

    def prefetch_rows(self, rows: np.ndarray) -> None:
        """Ask the kernel to read the phi rows ``rows`` ahead, all at once (posix_fadvise WILLNEED per row): the
        reads of scattered rows then overlap instead of waiting one by one (a hint: a no-op where unsupported)."""
        if PHI not in self.header or len(rows) == 0:
            return
        h = self.header[PHI]
        start, stop = h["data_offsets"]
        row_bytes = (stop - start) // max(1, int(h["shape"][0]))
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            for r in np.unique(np.asarray(rows, dtype=np.int64)):
                os.posix_fadvise(fd, self.offset + start + int(r) * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):
            pass
        finally:
            os.close(fd)


def prefetch(path: Path) -> None:
    """Ask the kernel to read ``path`` ahead (posix_fadvise WILLNEED; a no-op where that is missing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)


def block_rows(k: int, budget: int = BLOCK_BYTES) -> int:
    """Rows per streamed block: about ``budget`` bytes of float32 rows."""
    return max(1, budget // (4 * int(k)))


def stream(root: Path, items, k: int, fold_to: int | None = None, budget: int = BLOCK_BYTES, scaled: bool = True
           ) -> Iterator[tuple]:
    """(positions in ``items``, float32 rows [b, fold_to or k] decoded and folded) block by block over the shards;
    with ``scaled`` False, (positions, rows before their row scale, the scales [b] or None): a product with the
    rows is then scaled after it (one pass over the block fewer).

    ``items``: a frame with ``shard`` (path relative to ``root``) and ``row``; rows of one shard are read in
    ascending order, contiguous runs as slices of the memory map."""
    step = block_rows(k, budget)
    groups = list(items.groupby("shard", sort=False))
    for i, (shard, group) in enumerate(groups):
        if i + 1 < len(groups):
            prefetch(root / groups[i + 1][0])  # the kernel reads the next shard while this one is scored
        reader = ShardReader(root / shard)
        phi, scale = reader.rows()
        if phi.ndim != 2 or phi.shape[1] != k:
            raise ValueError(f"{root / shard} holds phi of shape {phi.shape}, the index says k = {k}; fix: rebuild "
                             "the index with `musicattr index --model.overwrite true`")
        order = np.argsort(group["row"].to_numpy(), kind="stable")
        rows = group["row"].to_numpy()[order]
        pos = group.index.to_numpy()[order]
        for a in range(0, len(rows), step):
            r, p = rows[a:a + step], pos[a:a + step]
            sl = slice(int(r[0]), int(r[-1]) + 1) if r[-1] - r[0] + 1 == len(r) else r
            if scaled:
                yield p, fold_rows(decode(phi[sl], None if scale is None else scale[sl]), fold_to)
            else:
                yield p, fold_rows(np.asarray(phi[sl], dtype=np.float32), fold_to), \
                    None if scale is None else np.asarray(scale[sl], dtype=np.float64)


class TopK:
    """The running exact top-m of Q columns of scores over blocks of rows: largest key first, ties by position.

    ``add(pos [b], key [b, Q], value [b, Q])`` keeps, per column, the m largest keys seen so far (the m of the
    union of the kept rows and the block: exact, whatever the block order); ``result()`` gives positions, keys
    and values [m, Q], sorted."""

    def __init__(self, m: int, q: int):
        if m < 1:
            raise ValueError(f"top-m with m = {m}: choose m >= 1")
        self.m, self.q = int(m), int(q)
        self.pos = np.zeros((0, q), dtype=np.int64)
        self.key = np.zeros((0, q))
        self.value = np.zeros((0, q))

    def add(self, pos: np.ndarray, key: np.ndarray, value: np.ndarray | None = None) -> None:
        value = key if value is None else value
        pos = np.broadcast_to(np.asarray(pos, dtype=np.int64).reshape(-1, 1), key.shape) if pos.ndim == 1 else pos
        P = np.concatenate([self.pos, pos])
        K = np.concatenate([self.key, np.asarray(key, dtype=np.float64)])
        V = np.concatenate([self.value, np.asarray(value, dtype=np.float64)])
        if len(K) > self.m:
            keep = np.argpartition(-K, self.m - 1, axis=0)[: self.m]
            P, K, V = (np.take_along_axis(a, keep, 0) for a in (P, K, V))
        self.pos, self.key, self.value = P, K, V

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.stack([np.lexsort((self.pos[:, c], -self.key[:, c])) for c in range(self.q)], 1) \
            if len(self.pos) else np.zeros((0, self.q), dtype=np.int64)
        return tuple(np.take_along_axis(a, order, 0) for a in (self.pos, self.key, self.value))


def write_index(root: str | Path, phi_blocks, k: int, precision: str = "float32",
                provenance: Mapping[str, Any] | None = None, rows_per_shard: int = 4096) -> dict[str, Any]:
    """Write an index folder from float rows (for synthetic and test indexes; ``musicattr index`` writes the
    same layout through its ``PartsWriter``): ``phi_blocks`` an iterable of (phi [b, k], sensitivity [b] or
    None, baseline_loss [b] or None). Rows are grouped in shards of ``rows_per_shard``. Returns index.json."""
    import pandas as pd
    from safetensors.torch import save_file

    from musicattr.atomic import atomic_path, atomic_write_json

    check_precision(precision)
    root = Path(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    frames, buf, n_total = [], [], 0

    def flush() -> None:
        nonlocal buf, n_total
        if not buf:
            return
        phi = torch.as_tensor(buf[0][0]) if len(buf) == 1 else torch.cat([torch.as_tensor(b[0]) for b in buf])
        n = len(phi)
        sens = torch.cat([torch.as_tensor(b[1], dtype=torch.float64) if b[1] is not None
                          else torch.as_tensor(b[0]).float().norm(dim=1).double() for b in buf])
        base = torch.cat([torch.as_tensor(b[2], dtype=torch.float64) if b[2] is not None
                          else torch.zeros(len(b[0]), dtype=torch.float64) for b in buf])
        idx = list(range(n_total, n_total + n))
        name = f"part-r0-{len(frames):06d}.safetensors"
        tensors = {**encode(phi, precision), "sensitivity": sens, "baseline_loss": base}
        with atomic_path(root / SHARDS / name) as tmp:
            save_file({key: v.contiguous() for key, v in tensors.items()}, str(tmp),
                      metadata={"indices": json.dumps(idx), "reduce": "cat"})
        frames.append(pd.DataFrame({"index": idx, "item_id": [f"item{i:07d}" for i in idx],
                                    "shard": f"{SHARDS}/{name}", "row": np.arange(n),
                                    "sensitivity": sens.numpy(), "baseline_loss": base.numpy()}))
        n_total += n
        buf = []

    held = 0
    for block in phi_blocks:
        block = (block,) if not isinstance(block, tuple) else block
        block = block + (None,) * (3 - len(block))
        buf.append(block)
        held += len(block[0])
        if held >= rows_per_shard:
            flush()
            held = 0
    flush()
    items = pd.concat(frames, ignore_index=True)
    with atomic_path(root / ITEMS_FILE) as tmp:
        items.to_parquet(tmp, index=False)
    prov = {"format": 1, "projection": "sketch", "k": int(k), "num_draws": 0, **(provenance or {})}
    if precision != "float32":
        prov["precision"] = precision
    shards = items.groupby("shard", sort=True).size()
    info = {"provenance": prov, "num_items": len(items), "k": int(k), "precision": precision,
            "shards": [{"file": f, "rows": int(n)} for f, n in shards.items()],
            "bytes_per_item": bytes_per_item(k, precision)}
    atomic_write_json(root / INDEX_FILE, info)
    return info
