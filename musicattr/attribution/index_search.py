"""faiss over the attribution index's shards: an exact inner-product search and an approximate one.

    exact        per streamed block of rows (``index_store.stream``), ``faiss.IndexFlatIP`` over the block's
                 decoded rows gives its top-m per query; the blocks' heads merge into the global top-m
                 (``index_store.TopK``). Same result as ``AttributionIndex.top`` (float32 rounding aside).
    approximate  two stages. (1) candidates: the sketch folded to k_c << k (``sketch.fold``: the sign sketch
                 at k_c, Var <P'x, P'y> <= 2 ||x||^2 ||y||^2 / k_c), held in memory, proposes the top M per query:
                 with ``nlist`` = 1 by a flat scan of every folded row (``faiss.IndexFlatIP``: the exact top M at
                 k_c, N k_c multiply-adds per query), else by a ``faiss.IndexIVFFlat`` (inner product, ``nlist``
                 lists, ``nprobe`` probed: faster, but it misses what the unprobed lists hold);
                 (2) exact re-scoring: the M candidates' full rows are read from the memory-mapped shards (all
                 queries' candidate rows requested from the kernel at once, so the scattered reads overlap) and
                 scored at k, and the best m are kept. Memory: N k_c 4 bytes + the lists; reads M rows per query.
                 Its recall, |top-m(approx) & top-m(exact)| / m, is measured against the exact top-m
                 (``recall``).
"""
from __future__ import annotations

import numpy as np
import torch

from musicattr.attribution.index import AttributionIndex
from musicattr.attribution.index_store import ShardReader, TopK, decode, fold_rows, stream


RESCORE_ROWS = 512  # candidate rows decoded at once in the exact re-scoring (512 x k x 4 B: 64 MiB at k = 2^15)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover
        raise ImportError("faiss is not installed; fix: pip install faiss-cpu==1.15.1 (requirements/base.txt)") from e
    return faiss


def _queries(index: AttributionIndex, psi: torch.Tensor | np.ndarray, k: int | None = None) -> np.ndarray:
    """Queries as faiss wants them: float32 [Q, k] contiguous (psi given as [k_index, Q])."""
    q, _ = index._query(torch.as_tensor(np.asarray(psi)), k)
    return np.ascontiguousarray(q.T, dtype=np.float32)


def exact_top(index: AttributionIndex, psi, m: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-m by tau^ with faiss.IndexFlatIP per streamed block: (positions [m, Q], tau^ [m, Q])."""
    faiss = _faiss()
    q = _queries(index, psi, k)
    kk = q.shape[1]
    head = TopK(min(m, index.num_items), q.shape[0])
    for pos, rows in stream(index.root, index.items, index.k, kk if kk != index.k else None):
        flat = faiss.IndexFlatIP(kk)
        flat.add(np.ascontiguousarray(rows, dtype=np.float32))
        d, i = flat.search(q, min(m, len(rows)))
        head.add(pos[i.T], d.T.astype(np.float64))
    p, _, tau = head.result()
    return p, tau


class ApproximateSearch:
    """Two-stage search (see the module doc): a flat scan (``nlist`` = 1) or an IVF over the sketch folded to
    ``k_c``, exact re-scoring at k."""

    def __init__(self, index: AttributionIndex, k_c: int = 256, nlist: int | None = None, train_rows: int = 65536,
                 seed: int = 0):
        faiss = _faiss()
        if index.provenance.get("projection", "sketch") != "sketch" or index.k % k_c:
            raise ValueError(f"the approximate search folds the sketch to k_c = {k_c}, which needs a sketch index with "
                             f"k_c dividing its k = {index.k}; fix: choose a power of two k_c <= {index.k}")
        self.index, self.k_c = index, int(k_c)
        n = index.num_items
        self.nlist = int(nlist or max(1, min(4096, round(4 * np.sqrt(n)))))
        self._shards: dict[str, ShardReader] = {}  # shard headers, parsed once
        self._maps: dict[str, tuple] = {}  # (phi, scale) memory maps of the shards read so far
        self.order = None  # the flat scan's faiss row -> position in index.items (the IVF keeps positions as ids)
        if self.nlist == 1:  # the flat scan: the folded rows go straight into faiss, block by block
            self.ivf = faiss.IndexFlatIP(self.k_c)
            order = []
            for pos, rows in stream(index.root, index.items, index.k, self.k_c):
                self.ivf.add(np.ascontiguousarray(rows, dtype=np.float32))
                order.append(np.asarray(pos, dtype=np.int64))
            self.order = np.concatenate(order)
            return
        coarse = np.empty((n, self.k_c), dtype=np.float32)  # the folded rows: N k_c 4 bytes
        for pos, rows in stream(index.root, index.items, index.k, self.k_c):
            coarse[pos] = rows
        quantizer = faiss.IndexFlatIP(self.k_c)
        self.ivf = faiss.IndexIVFFlat(quantizer, self.k_c, self.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = coarse[np.sort(rng.choice(n, min(n, max(train_rows, 39 * self.nlist)), replace=False))]
        self.ivf.cp.seed = seed
        self.ivf.train(sample)
        self.ivf.add(coarse)
        del coarse

    def _shard(self, name: str) -> ShardReader:
        if name not in self._shards:
            self._shards[name] = ShardReader(self.index.root / name)
        return self._shards[name]

    def release(self) -> None:
        """Unmap the shards' rows read so far (pages still mapped survive a page-cache eviction)."""
        self._maps.clear()

    def prefetch(self, positions: np.ndarray) -> None:
        """Ask the kernel for the rows of items at ``positions`` ahead of ``rows`` (scattered reads overlap)."""
        items = self.index.items
        shard, row = items["shard"].to_numpy()[positions], items["row"].to_numpy()[positions]
        for s in np.unique(shard):
            self._shard(s).prefetch_rows(row[shard == s])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The full decoded rows (float32 [len, k]) of items at ``positions``, read from the memory maps."""
        items = self.index.items
        out = np.empty((len(positions), self.index.k), dtype=np.float32)
        shard, row = items["shard"].to_numpy()[positions], items["row"].to_numpy()[positions]
        for s in np.unique(shard):
            if s not in self._maps:
                self._maps[s] = self._shard(s).rows()
            phi, scale = self._maps[s]
            sel = np.flatnonzero(shard == s)
            r = row[sel]
            order = np.argsort(r)
            out[sel[order]] = decode(phi[r[order]], None if scale is None else scale[r[order]])
        return out

    def top(self, psi, m: int, candidates: int = 1000, nprobe: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """The approximate top-m: (positions [m, Q], tau^ [m, Q] exact at k for the rows it returns)."""
        q_full = _queries(self.index, psi)
        q_c = np.ascontiguousarray(fold_rows(q_full, self.k_c))
        if self.order is None:
            self.ivf.nprobe = int(min(nprobe, self.nlist))
        _, cand = self.ivf.search(q_c, int(min(candidates, self.index.num_items)))
        if self.order is not None:
            cand = np.where(cand >= 0, self.order[np.maximum(cand, 0)], -1)
        self.prefetch(np.unique(cand[cand >= 0]))  # every query's candidate rows requested at once
        heads_pos, heads_tau = [], []
        for c in range(len(q_full)):
            pos = cand[c][cand[c] >= 0]
            tau = np.concatenate([self.rows(pos[a:a + RESCORE_ROWS]) @ q_full[c]  # bounded memory: a chunk at a time
                                  for a in range(0, len(pos), RESCORE_ROWS)]) if len(pos) else np.zeros(0, np.float32)
            head = TopK(min(m, len(pos)), 1)
            head.add(pos.astype(np.int64), tau[:, None].astype(np.float64))
            p, _, t = head.result()
            heads_pos.append(p[:, 0])
            heads_tau.append(t[:, 0])
        width = min(len(p) for p in heads_pos)
        return np.stack([p[:width] for p in heads_pos], 1), np.stack([t[:width] for t in heads_tau], 1)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-m & exact top-m| / m (positions [m, Q] each)."""
    m = exact.shape[0]
    return float(np.mean([len(set(approx[:, c]) & set(exact[:, c])) / m for c in range(exact.shape[1])]))
