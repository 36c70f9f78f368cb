"""The statistics of ``musicattr benchmark``: every number that rests on random draws (queries, subsets, seeds,
random sets) comes with a 95% percentile-bootstrap interval that resamples all of them together.

Notation: queries q, LDS subsets j (kept sets S_j), methods m with scores tau_m(q, i), and the retrained query
losses L_s(q, j) under training seed s.

    LDS_m        = 1/Q sum_q Spearman_j( g_m(q, j), -L_a(q, j) ),    g_m(q, j) = sum_{i in S_j} tau_m(q, i)
    bootstrap    queries AND subsets resampled with replacement (the same draws for every method), so the
                 interval of a paired difference LDS_m - LDS_m' holds the shared subsets' and queries' spread
    null         R random score vectors per query (u ~ U(0,1)^N, independent across queries): the LDS of chance
    ceiling      two seeds a, b of the same subsets: L_s(q, j) = mu(q, j) + c_s(q) + e_s(q, j), a seed offset c_s
                 common to every subset (it moves no rank within a seed) and seed noise of variance
                 sigma_q^2 = var_j (L_a - L_b) / 2 (the offset removed). A perfect predictor of the expected loss mu reaches
                 corr(mu, L_a) = sqrt(1 - sigma_q^2 / var_j L_a(q, j)) (Pearson), i.e. the square root of the
                 seed-to-seed correlation; on the Spearman scale of the LDS (6/pi) asin(r/2) (Gaussian case)
    leave-K-out  increase(q, R, s) = L(q, theta_{-R}^s) - L(q, theta0'^s); a method's top-K against the mean of
                 the random-K sets of the same seed; bootstrap over queries, seeds and random sets
    groups       truth(q, G) = mean_s increase(q, G, s); a method's credit of group G = sum_{i in G} tau_m(q, i);
                 top-1 = [argmax_G credit = argmax_G truth]; rank correlation = Spearman_G(credit, truth);
                 bootstrap over queries
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

LEVEL = 0.95


def _ci(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.nanpercentile(samples, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=axis)
    return lo, hi


def _half_width(samples: np.ndarray) -> float:
    lo, hi = _ci(samples)
    return float(hi - lo) / 2


def row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's correlation of each row pair of a, b [..., K] (average ranks; NaN for a constant row), over
    the columns where both are finite (a query of a later batch has no loss on the subsets retrained before it
    was added; NaN where fewer than 3 remain)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    bad = np.isnan(a) | np.isnan(b)
    if not bad.any():
        return _spearman_rows(a, b)
    k = a.shape[-1]
    fa, fb, fbad = a.reshape(-1, k), b.reshape(-1, k), bad.reshape(-1, k)
    out = np.full(len(fa), np.nan)
    patterns, which = np.unique(fbad, axis=0, return_inverse=True)
    which = np.asarray(which).ravel()
    for n, pattern in enumerate(patterns):
        keep = ~pattern
        if keep.sum() >= 3:
            rows = which == n
            out[rows] = _spearman_rows(fa[rows][:, keep], fb[rows][:, keep])
    return out.reshape(a.shape[:-1])


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1), np.nan)


def subset_sums(scores: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """g(q, j) = sum_{i in S_j} tau(q, i): scores [Q, N], kept [M, N] -> [Q, M]."""
    return np.asarray(scores, dtype=np.float64) @ np.asarray(kept, dtype=np.float64).T


def bootstrap_draws(n_queries: int, n_subsets: int, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Resampled query and subset indices [draws, Q] and [draws, M], shared by every method (paired)."""
    rng = np.random.default_rng([seed, 0xB007])
    return rng.integers(0, n_queries, (draws, n_queries)), rng.integers(0, n_subsets, (draws, n_subsets))


class _Ranker:
    """Average ranks of each row of x [Q, M] under column weights w [Q, M] (a bootstrap draw's multiplicities of
    the subsets; 0 for a subset left out), without sorting again: rank_j = W_<(x_j) + W_=(x_j) / 2, the total weight
    of the row's values below x_j plus half of those equal to it (its tie block, x_j included), which is the average
    rank of x_j's copies in the resampled row up to a shift that no correlation sees. The sort order and the tie
    blocks are found once (as flat indices); each draw costs three gathers and a cumulative sum."""

    def __init__(self, x: np.ndarray):
        q, m = x.shape
        order = np.argsort(x, axis=1, kind="stable")
        xs = np.take_along_axis(x, order, 1)
        first = np.ones((q, m), bool)
        first[:, 1:] = xs[:, 1:] != xs[:, :-1]                    # NaN != NaN: a missing value is a block of its own
        last = np.ones((q, m), bool)
        last[:, :-1] = first[:, 1:]
        pos = np.arange(m)
        start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
        end = np.minimum.accumulate(np.where(last, pos, m - 1)[:, ::-1], axis=1)[:, ::-1]
        row = (np.arange(q) * m)[:, None]
        self.shape = (q, m)
        self.order = (order + row).ravel()                       # sorted position -> flat (row, column)
        self.start, self.end = (start + row).ravel(), (end + row).ravel()
        inverse = np.empty_like(order)
        np.put_along_axis(inverse, order, np.broadcast_to(pos, (q, m)), 1)
        self.inverse = (inverse + row).ravel()                   # flat (row, column) -> its sorted position

    def ranks(self, w: np.ndarray) -> np.ndarray:
        ws = w.ravel().take(self.order).reshape(self.shape)
        cs = np.cumsum(ws, 1).ravel()
        r = (cs.take(self.start) - ws.ravel().take(self.start) + cs.take(self.end)) / 2
        return r.take(self.inverse).reshape(self.shape)


def _weighted_corr(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair of average ranks (``_Ranker``) with column weights w (a column of
    weight c counts c times); NaN for a row with total weight below 3 or constant (over its weighted columns) in a
    or b. Constant is exact: two distinct tie blocks' average ranks differ by at least 1, so a non-constant row's
    weighted sum of squares is at least 1/2, a constant one's only rounding."""
    sw = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        da = a - (w * a).sum(1, keepdims=True) / sw[:, None]
        db = b - (w * b).sum(1, keepdims=True) / sw[:, None]
        wa, wb = w * da, w * db
        sa, sb = (wa * da).sum(1), (wb * db).sum(1)
        rho = (wa * db).sum(1) / np.sqrt(sa * sb)
    rho[(sw < 3) | ~(sa >= 0.25) | ~(sb >= 0.25)] = np.nan
    return rho


def _boot_lds(sums: dict[str, np.ndarray], losses: np.ndarray, qi: np.ndarray, ji: np.ndarray) -> np.ndarray:
    """[methods, draws]: each method's LDS on the resampled queries qi [draws, Q] and subsets ji [draws, M]: the
    mean over the resampled queries of Spearman over the resampled subsets (a query's missing losses left out), as
    ``row_spearman`` on the resampled matrices gives it (to float rounding). A subset drawn c times is one column
    of weight c, a query drawn r times one row of weight r, so a draw ranks nothing anew (``_Ranker``)."""
    g_all = list(sums.values())
    if not all(np.isfinite(g).all() for g in g_all):
        return _boot_lds_resampled(sums, losses, qi, ji)
    q, m = losses.shape
    valid = np.isfinite(losses).astype(np.float64)
    loss_ranks, ranks = _Ranker(-losses), [_Ranker(np.asarray(g, np.float64)) for g in g_all]
    boot = np.empty((len(sums), len(qi)))
    for b in range(len(qi)):
        w = valid * np.bincount(ji[b], minlength=m)[None, :]
        rows = np.bincount(qi[b], minlength=q).astype(np.float64)
        rl = loss_ranks.ranks(w)
        for k, ranker in enumerate(ranks):
            rho = _weighted_corr(ranker.ranks(w), rl, w)
            ok = np.isfinite(rho) & (rows > 0)
            boot[k, b] = (rows[ok] * rho[ok]).sum() / rows[ok].sum() if ok.any() else np.nan
    return boot


def _boot_lds_resampled(sums: dict[str, np.ndarray], losses: np.ndarray, qi: np.ndarray,
                        ji: np.ndarray) -> np.ndarray:
    """``_boot_lds`` by resampling the matrices and ranking each draw afresh (scores with missing values)."""
    boot = np.empty((len(sums), len(qi)))
    for b in range(len(qi)):
        lb = -losses[qi[b]][:, ji[b]]
        for k, g in enumerate(sums.values()):
            boot[k, b] = np.nanmean(row_spearman(g[qi[b]][:, ji[b]], lb))
    return boot


def lds_bootstrap(sums: dict[str, np.ndarray], losses: np.ndarray, draws: int = 2000, seed: int = 0,
                  decompose: int = 0) -> dict:
    """LDS of each method with its interval, and every paired difference with its interval.

    sums: method -> g [Q, M]; losses: L_a [Q, M]. Returns {"lds": {m: (est, lo, hi, per_query)},
    "pairs": {(m1, m2): (diff, lo, hi, share of bootstrap draws > 0)}}. ``decompose`` > 0: also "widths":
    {(m1, m2): (half-width with only the queries resampled, with only the subsets resampled)} from that many
    draws each, which says whether more queries or more subsets narrow an interval (each shrinks about as
    1/sqrt of its own count; the joint half-width is about the root of their squares' sum)."""
    methods = list(sums)
    q, m = losses.shape
    qi, ji = bootstrap_draws(q, m, draws, seed)
    est = {k: row_spearman(v, -losses) for k, v in sums.items()}
    boot = _boot_lds(sums, losses, qi, ji)
    out = {"lds": {}, "pairs": {}, "draws": draws}
    if decompose:
        qd, jd = bootstrap_draws(q, m, decompose, seed + 1)
        alone = {"queries": _boot_lds(sums, losses, qd, np.broadcast_to(np.arange(m), (decompose, m))),
                 "subsets": _boot_lds(sums, losses, np.broadcast_to(np.arange(q), (decompose, q)), jd)}
        out["widths"] = {}
        for a in range(len(methods)):
            for c in range(a + 1, len(methods)):
                out["widths"][methods[a], methods[c]] = tuple(_half_width(v[a] - v[c]) for v in alone.values())
    for k, name in enumerate(methods):
        lo, hi = _ci(boot[k])
        out["lds"][name] = (float(np.nanmean(est[name])), float(lo), float(hi), est[name])
    for a in range(len(methods)):
        for c in range(a + 1, len(methods)):
            d = boot[a] - boot[c]
            lo, hi = _ci(d)
            out["pairs"][methods[a], methods[c]] = (float(np.nanmean(est[methods[a]]) - np.nanmean(est[methods[c]])),
                                                    float(lo), float(hi), float((d > 0).mean()))
    return out


def lds_null(kept: np.ndarray, losses: np.ndarray, vectors: int = 200, seed: int = 0) -> dict:
    """The LDS of ``vectors`` random score vectors per query: the mean over queries of each draw r gives the
    null distribution of a method's LDS; returns its mean, 95% range and the per-draw values."""
    rng = np.random.default_rng([seed, 0x2011])
    q, n = losses.shape[0], kept.shape[1]
    values = np.empty(vectors)
    for r in range(vectors):
        values[r] = np.nanmean(row_spearman(subset_sums(rng.random((q, n)), kept), -losses))
    lo, hi = _ci(values)
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "values": values}


def null_p(value: float, null: dict) -> float:
    """One-sided p of an LDS against the null draws: (1 + #{null >= value}) / (R + 1)."""
    v = null["values"]
    return float((1 + (v >= value).sum()) / (len(v) + 1))


def spearman_of_pearson(r):
    """Spearman's rho of a bivariate Gaussian with Pearson correlation r: (6/pi) asin(r/2)."""
    return 6 / np.pi * np.arcsin(np.clip(r, -1, 1) / 2)


def noise_ceiling(loss_a: np.ndarray, loss_b: np.ndarray, paired: np.ndarray, draws: int = 2000, seed: int = 0) -> dict:
    """The retraining-noise ceiling of the LDS from the subsets retrained with two seeds.

    loss_a [Q, M]: every subset under seed a; loss_b [Q, M]: NaN except the paired subsets (``paired``: their
    column indices, J of them). Per query: sigma^2 = var_J (L_a - L_b) / 2, reliability = 1 - sigma^2 /
    var_M L_a, ceiling (Pearson) = sqrt(reliability), on the LDS's Spearman scale (6/pi) asin(ceiling / 2);
    the seed-to-seed Spearman over the J pairs is reported beside it. Bootstrap: queries, subsets and pairs."""
    a, b = np.asarray(loss_a, np.float64), np.asarray(loss_b, np.float64)
    paired = np.asarray(paired)

    def ceiling(qs, ms, js):
        la = a[qs][:, ms]
        pa, pb = a[qs][:, paired[js]], b[qs][:, paired[js]]
        sigma2 = (pa - pb).var(1, ddof=1) / 2      # centred: a seed's offset common to all subsets is no noise
        var = la.var(1, ddof=1)
        rel = np.clip(1 - sigma2 / np.where(var > 0, var, np.nan), 0, 1)
        return spearman_of_pearson(np.sqrt(rel)), rel, row_spearman(pa, pb)

    q, m, j = a.shape[0], a.shape[1], len(paired)
    c, rel, seed_rho = ceiling(np.arange(q), np.arange(m), np.arange(j))
    rng = np.random.default_rng([seed, 0xCE11])
    boot = np.empty((draws, 3))
    for k in range(draws):
        bc, br, bs = ceiling(rng.integers(0, q, q), rng.integers(0, m, m), rng.integers(0, j, j))
        boot[k] = np.nanmean(bc), np.nanmean(br), np.nanmean(bs)
    lo, hi = _ci(boot)
    return {"ceiling": float(np.nanmean(c)), "ceiling_ci": (float(lo[0]), float(hi[0])),
            "reliability": float(np.nanmean(rel)), "reliability_ci": (float(lo[1]), float(hi[1])),
            "seed_spearman": float(np.nanmean(seed_rho)), "seed_spearman_ci": (float(lo[2]), float(hi[2])),
            "pairs": int(j), "subsets": int(m), "per_query": c}


def increase_bootstrap(values: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` [Q, S, R] (query, seed, random set; NaN where missing) with a bootstrap interval that
    resamples queries, seeds and sets."""
    v = np.asarray(values, np.float64)
    q, s, r = v.shape
    rng = np.random.default_rng([seed, 0x1C0])
    boot = np.empty(draws)
    for k in range(draws):
        sample = v[rng.integers(0, q, q)][:, rng.integers(0, s, s)][:, :, rng.integers(0, r, r)]
        # a draw that picked no present value is NaN, and _ci leaves it out
        boot[k] = np.nan if np.isnan(sample).all() else np.nanmean(sample)
    lo, hi = _ci(boot)
    return float(np.nanmean(v)), float(lo), float(hi)


def group_credit(credits: dict[str, np.ndarray], truth: np.ndarray, draws: int = 2000, seed: int = 0,
                 null_credits: dict[str, np.ndarray] | None = None) -> dict:
    """Per method: top-1 agreement and Spearman across groups between its group credits [Q, G] and the truth
    [Q, G] (the loss increase when the group is removed), each a mean over queries with a bootstrap interval;
    'chance' is the top-1 of a uniformly random group (1/G).

    ``null_credits[name]`` [P, Q, G]: the method's credits under P permutations of its scores over the items of
    each query. A sum over a group grows with the group's size wherever the scores' mean is not zero, and so does
    the truth, so a method can rank groups by size alone; ``excess_top1`` / ``excess_spearman`` are the method's
    values minus the mean of its permuted ones (per query, then bootstrapped like the values), what the method
    knows beyond the groups' sizes and its scores' distribution."""
    t = np.asarray(truth, np.float64)
    q = t.shape[0]
    rng = np.random.default_rng([seed, 0x6A0])
    idx = rng.integers(0, q, (draws, q))
    out = {}
    for name, c in credits.items():
        c = np.asarray(c, np.float64)
        top1 = (c.argmax(1) == t.argmax(1)).astype(float)
        rho = row_spearman(c, t)
        b1, br = top1[idx].mean(1), np.nanmean(rho[idx], axis=1)
        out[name] = {"top1": float(top1.mean()), "top1_ci": tuple(map(float, _ci(b1))),
                     "spearman": float(np.nanmean(rho)), "spearman_ci": tuple(map(float, _ci(br)))}
        if null_credits is not None and name in null_credits:
            n = np.asarray(null_credits[name], np.float64)                     # [P, Q, G]
            x1 = top1 - (n.argmax(2) == t.argmax(1)).mean(0)                     # per query: value - permuted mean
            xr = rho - np.nanmean(row_spearman(n, np.broadcast_to(t, n.shape)), 0)
            out[name].update(excess_top1=float(x1.mean()), excess_top1_ci=tuple(map(float, _ci(x1[idx].mean(1)))),
                             excess_spearman=float(np.nanmean(xr)),
                             excess_spearman_ci=tuple(map(float, _ci(np.nanmean(xr[idx], axis=1)))))
    out["chance_top1"] = 1.0 / t.shape[1]
    return out
