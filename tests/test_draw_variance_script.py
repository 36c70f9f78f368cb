"""scripts/draw_variance.py's gains: stratified and Neyman gains are >= 1 and equal 1 for noise that does not depend
on t; antithetic pairs gain 1 / (1 + rho)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_script


def test_draw_gains():
    dv = load_script("draw_variance")
    rng = np.random.default_rng(0)
    t = rng.random((32, 4000))
    flat = rng.standard_normal((32, 4000))
    g = dv.draw_gains(flat, None, t, 8)
    assert g["stratified_gain"] == pytest.approx(1.0, abs=0.02) and g["neyman_gain"] == pytest.approx(1.0, abs=0.02)
    loud = flat * np.where(t > 0.875, 4.0, 1.0) + 3.0 * (t > 0.5)   # bin-dependent spread and mean
    g = dv.draw_gains(loud, None, t, 8)
    assert g["neyman_gain"] > g["stratified_gain"] > 1.5
    assert dv.draw_gains(flat, flat, t, 8)["antithetic_gain"] == pytest.approx(0.5)        # rho = +1
    half = dv.draw_gains(flat, rng.standard_normal((32, 4000)), t, 8)
    assert half["antithetic_gain"] == pytest.approx(1.0, abs=0.03)                            # independent halves
