"""Credit shares: the rule, the noise floor, aggregation by a metadata column."""
import numpy as np
import pandas as pd
import pytest

from musicattr.report.credits import UNKNOWN, aggregate_credits, credit_shares, share_intervals


def scores(tau, **extra) -> pd.DataFrame:
    tau = np.asarray(tau, dtype=np.float64)
    order = np.argsort(-tau, kind="stable")
    rank = np.empty(len(tau), dtype=np.int64)
    rank[order] = np.arange(1, len(tau) + 1)
    return pd.DataFrame({"item_id": [f"t{i}" for i in range(len(tau))], "score": tau, "rank": rank, **extra})


def test_positive_rule_normalises_the_scores_above_the_floor():
    t = scores([0.4, 0.1, -0.2, 0.5, 1e-9, 0.0])
    share = credit_shares(t, "positive", floor=1e-8)
    assert share.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(share, [0.4, 0.1, 0, 0.5, 0, 0])  # 1e-9 is below the floor, 0 and -0.2 not positive


def test_softmax_rule_is_scale_free_and_sharpens_with_lower_temperature():
    t = scores([3.0, 2.0, 1.0, -1.0])
    share = credit_shares(t, "softmax", temperature=1.0)
    assert share.sum() == pytest.approx(1.0) and share.iloc[3] == 0
    sigma = np.std([3.0, 2.0, 1.0, -1.0])
    w = np.exp(np.array([3.0, 2.0, 1.0]) / sigma)
    np.testing.assert_allclose(share[:3], w / w.sum())
    scaled = credit_shares(scores([3e-6, 2e-6, 1e-6, -1e-6]), "softmax")
    np.testing.assert_allclose(scaled, share)  # the same shares for scores 1e6 times smaller
    sharp = credit_shares(t, "softmax", temperature=0.25)
    assert sharp.iloc[0] > share.iloc[0]


def test_relative_score_credits_the_same_tracks_by_another_value():
    t = scores([0.2, 0.1, -0.1], relative_score=[1.0, 3.0, -0.5])
    share = credit_shares(t, "positive", column="relative_score")
    np.testing.assert_allclose(share, [0.25, 0.75, 0.0])


def test_nothing_credited_gives_zero_shares():
    share = credit_shares(scores([-0.1, -0.3, 1e-12]), floor=1e-9)
    assert (share == 0).all()


def test_bad_rule_or_column_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="positive, softmax"):
        credit_shares(scores([1.0]), "linear")
    with pytest.raises(ValueError, match="relative true"):
        credit_shares(scores([1.0]), column="relative_score")
    with pytest.raises(ValueError, match="temperature"):
        credit_shares(scores([1.0]), "softmax", temperature=0)


def test_aggregation_sums_shares_per_value_and_names_missing_values():
    t = scores([0.5, 0.2, 0.2, 0.1, -1.0], composer=["Bach", "Byrd", "Bach", None, "Bach"])
    t["share"] = credit_shares(t)
    agg = aggregate_credits(t, "composer")
    assert list(agg["composer"]) == ["Bach", "Byrd", UNKNOWN]
    np.testing.assert_allclose(agg["share"], [0.7, 0.2, 0.1])
    assert list(agg["tracks"]) == [2, 1, 1]  # the negatively scored Bach track holds no credit
    assert list(agg["best_rank"]) == [1, 2, 4]
    assert agg["share"].sum() == pytest.approx(1.0)


def test_a_score_within_twice_its_standard_error_is_not_credited():
    t = scores([0.4, 0.1, 0.5, 0.3], score_se=[0.1, 0.06, 0.3, float("nan")])
    share = credit_shares(t)
    # 0.4 > 2 x 0.1 and 0.3 (no error known: the floor only) are credited; 0.1 < 2 x 0.06 and 0.5 < 2 x 0.3 not
    np.testing.assert_allclose(share, [0.4 / 0.7, 0, 0, 0.3 / 0.7])
    np.testing.assert_allclose(credit_shares(t, z=0.0), [0.4 / 1.3, 0.1 / 1.3, 0.5 / 1.3, 0.3 / 1.3])


def test_share_intervals_cover_the_share_and_widen_with_the_error():
    tight = scores([0.4, 0.3, 0.2, 0.1], score_se=[1e-4] * 4)
    loose = scores([0.4, 0.3, 0.2, 0.1], score_se=[0.04] * 4)
    a, b = share_intervals(tight, resamples=400), share_intervals(loose, resamples=400)
    share = credit_shares(tight)
    assert ((a["share_lo"] <= share + 1e-9) & (share <= a["share_hi"] + 1e-9)).all()
    assert ((b["share_hi"] - b["share_lo"]) > (a["share_hi"] - a["share_lo"]) + 0.01).all()
    pd.testing.assert_frame_equal(share_intervals(loose, resamples=400), b)  # seeded: reproducible
