"""`musicattr ekfac` (musicattr.peers.factors): the EK-FAC factors of theta0 in one folder, kept when up to date,
refitted for another checkpoint or seed; AbU+ (`unlearn --ekfac`) then scores with its relative score in the
EK-FAC metric, s_i = ||P^1/2 g_i||, cached apart from the diagonal Fisher's."""
from __future__ import annotations

import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import chdir, make_module, make_store, save_checkpoint
from musicattr.attribution.ekfac import EKFAC, MAPPING_FILE
from musicattr.attribution.fisher import FisherModule
from musicattr.attribution.preconditioner import DiagonalFisher
from musicattr.attribution.score import ScoringModule
from musicattr.attribution.unlearn import load_unlearned, loss_gradient, run_unlearn
from musicattr.data.datamodules import StorePredictDataModule, collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.fingerprint import file_fingerprint
from musicattr.models.sat_task import SATDiffusionTask
from musicattr.peers.factors import run_ekfac

N_ITEMS, T = 6, 4


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, inference_mode=False, default_root_dir="lightning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """theta0, its store, diagonal Fisher and EK-FAC factors (the stage, as `make demo` runs it)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("factors")
    make_store(d / "store", n=N_ITEMS)
    save_checkpoint(make_module(), d / "theta0.ckpt")
    with chdir(d):
        _trainer().predict(FisherModule("theta0.ckpt", "fisher.safetensors", num_draws=2),
                           datamodule=StorePredictDataModule("store", 3))
        res = run_ekfac("theta0.ckpt", "store", "ekfac", fit_draws=2, batch_size=3)
    return d, res


def test_stage_writes_loadable_factors_and_keeps_them(run, tmp_path):
    d, res = run
    mapping = json.loads((d / "ekfac" / MAPPING_FILE).read_text())
    assert res["layers"] == len(mapping["modules"]) > 0
    assert mapping["checkpoint_fingerprint"] == file_fingerprint(str(d / "theta0.ckpt"))
    pre = EKFAC.load(d / "ekfac", checkpoint_fingerprint=mapping["checkpoint_fingerprint"])
    assert len(pre.layers) == res["layers"]
    stamp = (d / "ekfac" / "lambda_matrix.safetensors").stat().st_mtime_ns
    with chdir(d):
        again = run_ekfac("theta0.ckpt", "store", "ekfac", fit_draws=2, batch_size=3)
    # kronfluence's folder reused, nothing copied; it reports what the fit cost when made
    assert again["fit_reused"] and not res["fit_reused"] and again["fit_seconds"] == res["fit_seconds"] > 0
    assert (d / "ekfac" / "lambda_matrix.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another checkpoint"):
        EKFAC.load(d / "ekfac", checkpoint_fingerprint="0" * 16)
    with pytest.raises(FileNotFoundError, match="musicattr fit"):
        run_ekfac(str(tmp_path / "missing.ckpt"), str(d / "store"), str(tmp_path / "x"))


def test_another_seed_refits_into_the_same_folder(run, tmp_path):
    d, _ = run
    import shutil

    shutil.copytree(d / "ekfac", tmp_path / "ekfac")
    with chdir(d):
        res = run_ekfac("theta0.ckpt", "store", str(tmp_path / "ekfac"), fit_draws=2, batch_size=3, seed=1)
    assert res["fit_seconds"] > 0
    assert json.loads((tmp_path / "ekfac" / MAPPING_FILE).read_text())["fit"]["seed"] == 1
    a = EKFAC.load(d / "ekfac").layers
    b = EKFAC.load(tmp_path / "ekfac").layers
    m = next(iter(a))
    assert not torch.allclose(a[m]["lam"], b[m]["lam"])  # other draws, other eigenvalue corrections


@pytest.mark.slow
def test_abu_plus_relative_score_is_in_the_ekfac_metric(run):
    """unlearn --ekfac, then attribute --relative: s_i = ||P^1/2 g_i|| with P = EK-FAC + the diagonal Fisher (by hand,
    from each item's whole gradient), and its cache is not the diagonal Fisher's."""
    d, _ = run
    with chdir(d):
        meta = run_unlearn("theta0.ckpt", "fisher.safetensors", "ek.safetensors", query_item="2", store="store",
                           lr=1e-3, num_draws=4, ekfac="ekfac")
        assert meta["preconditioner"] == "ekfac"
        m = ScoringModule("theta0.ckpt", "ek.safetensors", "attr_ek", num_draws=T, relative=True, draws_per_forward=2)
        _trainer().predict(m, datamodule=StorePredictDataModule("store", 3))
        df = pd.read_parquet("attr_ek/scores.parquet").sort_values("index")
        task = SATDiffusionTask()
        model = task.load("theta0.ckpt")
        names = sorted(load_unlearned("ek.safetensors")[0])
        params = {k: v for k, v in task.net(model).named_parameters() if k in names}
        fp = file_fingerprint("theta0.ckpt")
        pre = EKFAC.load("ekfac", names, 1e-3, fallback=DiagonalFisher.load("fisher.safetensors", params, 1e-3, fp),
                         checkpoint_fingerprint=fp)
        store = LatentStore("store")
        hand = []
        for pos in range(len(store)):
            g = loss_gradient(task, model, params, collate_items([store[pos]]), 0, T, draws_per_forward=2)
            hand.append(float(sum(v.pow(2).sum() for v in pre.apply_sqrt(g).values()).sqrt()))
        np.testing.assert_allclose(df["sensitivity"], hand, rtol=1e-4)
        run_unlearn("theta0.ckpt", "fisher.safetensors", "diag.safetensors", query_item="2", store="store", lr=1e-3,
                    num_draws=4)
        m = ScoringModule("theta0.ckpt", "diag.safetensors", "attr_diag", num_draws=T, relative=True,
                          draws_per_forward=2)
        _trainer().predict(m, datamodule=StorePredictDataModule("store", 3))
        diag = pd.read_parquet("attr_diag/scores.parquet").sort_values("index")
    assert len(list((d / "store" / "sensitivity").glob("*.parquet"))) == 2
    assert not np.allclose(diag["sensitivity"], df["sensitivity"], rtol=1e-2)


def test_factor_device_is_checked_before_any_work():
    import torch

    from musicattr.peers.kronfluence_peer import analyzer_on_cpu

    assert analyzer_on_cpu("cpu") is True
    with pytest.raises(ValueError, match="fix: 'cpu' or 'cuda'"):
        analyzer_on_cpu("tpu")
    if torch.cuda.is_available():
        assert analyzer_on_cpu("cuda") is False
    else:
        with pytest.raises(RuntimeError, match="fix: --device cpu"):
            analyzer_on_cpu("cuda")
    with pytest.raises(ValueError, match="device"):
        run_ekfac("missing.ckpt", "store", "out", device="tpu")
