"""Safetensors files written tensor by tensor, without a copy of the whole dict in memory.

``safetensors.torch.save_file`` turns every tensor into a bytes object before writing, so a file of S bytes
costs S bytes of memory on top of the tensors (8.3 GB for a float64 Fisher sum at 1 B parameters). The format
is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, [begin, end) byte offsets, and
``__metadata__``; padded with spaces to a multiple of 8) and the tensors' bytes in header order; this writer
streams each tensor's own buffer into the file, in safetensors' own order (wider dtypes first, then by name).
Without metadata the file is byte for byte the one ``save_file`` writes; with metadata only the order of the
metadata keys may differ (``save_file`` takes it from a hash map; here it is the order given).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
# safetensors' Dtype enum order (its files list tensors by this, descending, then by name)
ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")


def _order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(tensors, key=lambda n: (-ORDER.index(DTYPES[tensors[n].dtype]), n))


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU; name -> tensor) to ``path`` in the safetensors format, one tensor at a time."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    at = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name here; fix: cast it to one of "
                            f"{sorted(str(d) for d in DTYPES)}")
    order = _order(tensors)
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


NAMES = {v: k for k, v in DTYPES.items()}


class TensorFileReader:
    """One safetensors file read tensor by tensor with plain reads (no memory map): a tensor costs its own
    memory while it is held and nothing after, where a mapped file keeps every page read resident in the process
    until it is closed (16 GB for two float64 Fisher parts at 1 B parameters)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._f = open(self.path, "rb")
        n = struct.unpack("<Q", self._f.read(8))[0]
        self.header = json.loads(self._f.read(n))
        self.metadata = self.header.pop("__metadata__", None)
        self._start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        h = self.header[name]
        begin, end = h["data_offsets"]
        t = torch.empty(h["shape"], dtype=NAMES[h["dtype"]])
        if end > begin:
            self._f.seek(self._start + begin)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            if self._f.readinto(view) != end - begin:
                raise OSError(f"{self.path}: {name} is truncated; fix: rerun the stage that wrote the file")
        return t

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TensorFileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, from its header alone (no tensor is read)."""
    with TensorFileReader(path) as r:
        return r.metadata


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(every tensor of a safetensors file, its metadata), read with plain reads: the tensors' own memory only."""
    with TensorFileReader(path) as r:
        return {k: r.get_tensor(k) for k in r.keys()}, r.metadata
