"""The random projection P of the attribution index: a seeded sign sketch, never held as a matrix.

    P x = sum over tensors l of  P_l x_l,      (P_l x_l)[b] = sum_{j : h_l(j) mod k = b}  s_l(j) x_l[j]

with, for every element j of tensor l, a bucket hash h_l(j) uniform in [0, 2^30) and a sign s_l(j) = +-1
drawn from a generator seeded by (seed, tensor name) (CountSketch, Charikar et al. 2002; feature hashing,
Weinberger et al. 2009). Each coordinate lands in one of k buckets, so projecting costs one pass over the
tensor (``index_add_``) and storing P costs one int16 per parameter for k <= 2^15 (bucket b and sign s packed
as b or ~b = -(b + 1): 2.1 GB at 1.04 B parameters), else one int32 and one int8 (5 bytes), whatever k is.

Inner products are kept in expectation, E <Px, Py> = <x, y>, with
Var <Px, Py> = (||x||^2 ||y||^2 + <x,y>^2 - 2 sum_j x_j^2 y_j^2) / k <= 2 ||x||^2 ||y||^2 / k, so by
Chebyshev (the Johnson-Lindenstrauss moment bound of sparse sketches)

    P( |<Px, Py> - <x, y>| > eps ||x|| ||y|| ) <= 2 / (k eps^2)        for every x, y.

Since the bucket is h mod k, the sketch at k' (k' dividing k) is the sketch at k folded: y'[b] = sum of
y[b + m k'] (``fold``). One index at the largest k gives every smaller k for the fidelity curve.

``IdentityProjection`` (k = number of parameters, the tensors concatenated in name order) is the
unprojected reference: with it the index score is the exact first-order product.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch

HASH_RANGE = 1 << 30  # bucket hashes are uniform in [0, 2^30): any power-of-two k up to 2^30 divides it
PACKED_K = 1 << 15    # up to this k, bucket and sign are kept in one int16 per parameter (2 bytes instead of 5)


def tensor_seed(seed: int, name: str) -> int:
    """63-bit seed of the hash of one tensor (blake2b of the projection seed and the tensor name)."""
    digest = hashlib.blake2b(f"sketch\x1f{seed}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SignSketch:
    """P: R^n -> R^k for the named tensors ``sizes`` (name -> number of elements)."""

    kind = "sketch"

    def __init__(self, sizes: Mapping[str, int], k: int, seed: int = 0, device: torch.device | str = "cpu"):
        if not 0 < k <= HASH_RANGE:
            raise ValueError(f"k = {k}: choose 0 < k <= 2^30 (a power of two, e.g. 2^11 to 2^15, so that every "
                             "smaller power of two is a fold of it)")
        self.k, self.seed = int(k), int(seed)
        self.packed = self.k <= PACKED_K
        self.buckets: dict[str, torch.Tensor] = {}  # packed: the codes (int16), else h mod k (int32)
        self.signs: dict[str, torch.Tensor] = {}    # packed: empty, else s (int8)
        for name, n in sizes.items():
            g = torch.Generator().manual_seed(tensor_seed(seed, name))
            h = torch.randint(0, HASH_RANGE, (int(n),), generator=g, dtype=torch.int64)
            s = torch.randint(0, 2, (int(n),), generator=g, dtype=torch.int8) * 2 - 1
            b = h % self.k
            del h
            if self.packed:  # bucket b with sign +1 -> b, with sign -1 -> ~b = -(b + 1): int16 holds both for k <= 2^15
                self.buckets[name] = torch.where(s > 0, b, ~b).to(device, torch.int16)
            else:
                self.buckets[name] = b.to(device, torch.int32)
                self.signs[name] = s.to(device)

    def hashes(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket h(j) mod k as int32, sign s(j) = +-1) of every element of tensor ``name``."""
        if not self.packed:
            return self.buckets[name], self.signs[name]
        c = self.buckets[name].to(torch.int32)
        neg = c >> 15  # -1 where the sign is -1, else 0
        return c ^ neg, neg * 2 + 1

    def add(self, out: torch.Tensor, name: str, x: torch.Tensor) -> None:
        """out [k] += P_name x (x any shape, its elements in row-major order)."""
        bucket, sign = self.hashes(name)
        signed = x.reshape(-1).to(out.dtype) * sign
        out.index_add_(0, bucket, signed)

    def to(self, device) -> "SignSketch":
        self.buckets = {k: v.to(device) for k, v in self.buckets.items()}
        self.signs = {k: v.to(device) for k, v in self.signs.items()}
        return self


class IdentityProjection:
    """P = I: the tensors concatenated in sorted name order (k = their number of elements)."""

    kind = "identity"

    def __init__(self, sizes: Mapping[str, int], k: int | None = None, seed: int = 0, device=None):
        total = sum(int(n) for n in sizes.values())
        if k is not None and k != total:
            raise ValueError(f"the identity projection has k = the number of parameters ({total}), not {k}; "
                             f"fix: pass k {total}, or use the sketch projection")
        self.k, self.seed, self.offsets, at = total, seed, {}, 0
        for name in sorted(sizes):
            self.offsets[name] = (at, at + int(sizes[name]))
            at += int(sizes[name])

    def add(self, out: torch.Tensor, name: str, x: torch.Tensor) -> None:
        a, b = self.offsets[name]
        out[a:b] += x.reshape(-1).to(out.dtype)

    def to(self, device) -> "IdentityProjection":
        return self


PROJECTIONS = {"sketch": SignSketch, "identity": IdentityProjection}


def make_projection(kind: str, sizes: Mapping[str, int], k: int | None, seed: int, device="cpu"):
    """The projection named ``kind`` ('sketch' or 'identity') over the tensors ``sizes``."""
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection {kind!r}; fix: choose one of {sorted(PROJECTIONS)}")
    return PROJECTIONS[kind](sizes, k, seed, device)


def fold(y: torch.Tensor, k: int) -> torch.Tensor:
    """The sign sketch at ``k`` from the sketch ``y`` [..., K] at a multiple K of k: y'[b] = sum_m y[b + m k]."""
    big = y.shape[-1]
    if big % k:
        raise ValueError(f"cannot fold a sketch of k = {big} to k = {k}: {k} does not divide {big}")
    return y.reshape(*y.shape[:-1], big // k, k).sum(-2)
