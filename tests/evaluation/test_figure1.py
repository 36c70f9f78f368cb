import numpy as np
import torch

from musicattr.evaluation.figure1 import draw_figure1, figure1_curves, plot_figure1



def test_curves_and_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 50, generator=g)
    other = u + 0.5 * torch.randn(3, 50, generator=g)
    curves = figure1_curves(u, {"similarity/all-against-all": other, "similarity/average": -u})
    mean = curves["unlearning"]["minmax"][0]
    assert mean[0] == 1.0 and mean[-1] == 0.0 and np.all(np.diff(mean) <= 1e-12)
    assert np.allclose(curves["similarity/average"]["minmax"][0], 1.0 - mean)
    assert np.allclose(curves["unlearning"]["softmax"][0].sum(), 1.0)
    out = plot_figure1(u, {"similarity/all-against-all": other}, str(tmp_path / "sub" / "fig1.png"), "test")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_softmax_panel_is_what_its_title_says():
    """Default: softmax of per-query z-scores, and the panel says so; 'raw' is the paper's softmax(s)."""
    u = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    order = [0, 2, 1, 3]
    s = u[0, order]
    z = (s - s.mean()) / s.std()
    zs = figure1_curves(u, {})["unlearning"]["softmax"][0]
    np.testing.assert_allclose(zs, torch.softmax(z, 0).numpy(), rtol=1e-12)
    raw = figure1_curves(u, {}, softmax_of="raw")["unlearning"]["softmax"][0]
    np.testing.assert_allclose(raw, torch.softmax(s, 0).numpy(), rtol=1e-12)
    assert "standardised" in draw_figure1(u, {}).axes[1].get_title()
    assert "raw scores" in draw_figure1(u, {}, softmax_of="raw").axes[1].get_title()
