"""The sets of training items a counterfactual retrain leaves out, and the plan of retrains.

A retrain is a pair (removed set R, training seed s): the DiT trained with the campaign's recipe on the
store D minus R. The campaign's retrains:

    LDS          R_j = D \\ S_j for M random subsets S_j of floor(alpha N) items (drawn once with
                 ``subset_seed``; the same subsets for every method and query), each with every LDS seed;
                 the noise floor retrains the first subsets again with another seed
    leave-K-out  R = the top-K items of a method's scores for a query, each with every leave-K-out seed;
                 random-K: R = K items drawn with seed s, the same set for every query
    reference    R = {} (theta0': the full store with the campaign's recipe and seed s), against which every
                 leave-K-out loss increase is measured

Two purposes that need the same (R, s) share one retrain.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np


def lds_subsets(item_ids: list[str], m: int, alpha: float, seed: int) -> list[tuple[str, ...]]:
    """The removed sets of M random subsets keeping floor(alpha N) items each: R_j = D \\ S_j (sorted ids)."""
    n = len(item_ids)
    keep = int(alpha * n)
    if not 0 < keep < n:
        raise ValueError(f"alpha {alpha} keeps {keep} of {n} items; fix: choose 0 < alpha < 1 with at least one "
                         "item kept and one removed")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(m):
        kept = set(rng.permutation(n)[:keep].tolist())
        out.append(tuple(sorted(item_ids[i] for i in range(n) if i not in kept)))
    return out


def top_k(scores: np.ndarray, item_ids: list[str], k: int) -> tuple[str, ...]:
    """The ids of the k highest scores (ties broken by store position), sorted."""
    if not 0 < k < len(item_ids):
        raise ValueError(f"K = {k} of {len(item_ids)} items; fix: choose 0 < K < N")
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return tuple(sorted(item_ids[i] for i in order[:k]))


def random_scores(n: int, seed: int) -> np.ndarray:
    """The method ``random``: uniform scores drawn with ``seed``, the same for every query. Its top-K is the
    random-K removal of leave-K-out; its LDS is the chance level."""
    return np.random.default_rng([seed, 0x5EED]).random(n)


@dataclass
class PlannedRetrain:
    """One retrain of the plan: the removed item ids (sorted), the training seed, and what it is for."""

    removed: tuple[str, ...]
    seed: int
    purposes: list[str] = field(default_factory=list)

    def key(self, context: dict) -> dict:
        """What the trained model depends on: the removed set, the seed and the context (the store's
        fingerprint and the recipe). The removed set enters through its hash (it may hold 50k ids)."""
        removed = hashlib.blake2b("\n".join(self.removed).encode(), digest_size=16).hexdigest()
        return {**context, "removed_hash": removed, "removed_count": len(self.removed), "seed": self.seed}

    def name(self, context: dict) -> str:
        """The run folder's name: the seed and a hash of the key."""
        digest = hashlib.blake2b(json.dumps(self.key(context), sort_keys=True).encode(), digest_size=6).hexdigest()
        return f"s{self.seed}-{len(self.removed)}-{digest}"


class Plan:
    """The retrains of a campaign, each (removed set, seed) once, in the order they were asked for."""

    def __init__(self):
        self.retrains: list[PlannedRetrain] = []
        self._index: dict[tuple[tuple[str, ...], int], int] = {}

    def add(self, removed, seed: int, purpose: str) -> PlannedRetrain:
        key = (tuple(sorted(removed)), int(seed))
        if key not in self._index:
            self._index[key] = len(self.retrains)
            self.retrains.append(PlannedRetrain(key[0], key[1]))
        r = self.retrains[self._index[key]]
        r.purposes.append(purpose)
        return r

    def __len__(self) -> int:
        return len(self.retrains)

    def __iter__(self):
        return iter(self.retrains)
