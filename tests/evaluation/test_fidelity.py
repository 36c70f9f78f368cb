"""The agreement measures of the index fidelity (musicattr/evaluation/fidelity.py)."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from musicattr.evaluation.fidelity import agreement, topk_overlap


def test_topk_overlap_counts_shared_items_of_the_two_top_k():
    exact = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    assert topk_overlap(exact, exact, 3) == 3
    assert topk_overlap(-exact, exact, 3) == 0
    assert topk_overlap(np.array([9.0, 1.0, 7.0, 8.0, 0.0, 0.0]), exact, 3) == 2  # {0, 3, 2} vs {0, 1, 2}
    assert topk_overlap(exact, exact, 100) == 6  # k beyond N: all of them


def test_agreement_is_spearman_and_overlaps():
    rng = np.random.default_rng(0)
    exact = rng.standard_normal(300)
    estimate = exact + 0.3 * rng.standard_normal(300)
    a = agreement(estimate, exact)
    assert a["spearman"] == pytest.approx(spearmanr(estimate, exact).statistic, abs=1e-6)
    assert set(a) == {"spearman", "top10", "top100"} and 0 <= a["top10"] <= 10 and a["top100"] <= 100


@pytest.mark.slow
def test_index_fidelity_stage_from_the_command_line(tmp_path):
    """`musicattr index-fidelity` on a tiny run (2 training-item queries, no generation): the index against
    exact Eq. 1 at two sketch sizes; the identity of the unprojected first order with the largest k's estimate
    is not assumed, only that every row is there and the agreement is measured."""
    import json

    import yaml

    from conftest import build_planted_setup, cli

    setup = build_planted_setup(tmp_path / "run")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "index.yaml").write_text(yaml.safe_dump({"model": {"target": "all", "damping": 1e-3, "num_draws": 4,
                                                              "seed": 0, "mask_loss": False,
                                                              "draws_per_forward": 4}}))
    cli(["index-fidelity", "--checkpoint", setup["ckpt"], "--store", setup["store"], "--fisher", setup["fisher"],
         "--out", str(tmp_path / "fid"), "--config_dir", str(cfg), "--ks", "[256, 512]", "--generated", "0",
         "--train", "2", "--num_draws", "4", "--lr", "1e-4", "--batch_size", "6"], tmp_path)
    result = json.loads((tmp_path / "fid" / "fidelity.json").read_text())
    assert {r["k"] for r in result["per_query"]} == {"unprojected", "256", "512"}
    assert len({r["name"] for r in result["per_query"]}) == 2
    assert all(-1 <= r["eq1_spearman"] <= 1 for r in result["per_query"])
    assert (tmp_path / "fid" / "fidelity.md").exists() and (tmp_path / "fid" / "k_curve.png").exists()
