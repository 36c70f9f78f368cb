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
    for name in _order(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in _order(tensors):
            t = tensors[name].detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
