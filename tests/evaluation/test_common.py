"""The scoring pass of the function stages (evaluation/common.py): their --trainer.* options reach the Trainer."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_module, make_store, save_checkpoint
from musicattr.evaluation.common import predict_trainer, score_store



def test_trainer_options_reach_the_trainer_and_ddp_is_refused():
    t = predict_trainer({"accelerator": "cpu", "devices": 1, "max_epochs": 3, "logger": False})
    assert t.max_epochs == 3 and t.logger is None
    with pytest.raises(ValueError, match="ddp_spawn"):
        predict_trainer({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})


@pytest.mark.slow
def test_score_store_with_two_spawned_processes_equals_one(tmp_path, monkeypatch):
    import lightning as L

    from musicattr.attribution.fisher import FisherModule
    from musicattr.attribution.unlearn import run_unlearn
    from musicattr.data.datamodules import StorePredictDataModule

    monkeypatch.chdir(tmp_path)
    make_store("store", n=10)
    save_checkpoint(make_module(), "theta0.ckpt")
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, inference_mode=False,
              use_distributed_sampler=False).predict(FisherModule("theta0.ckpt", "fisher.safetensors", num_draws=2),
                                                     datamodule=StorePredictDataModule("store", 4))
    run_unlearn("theta0.ckpt", "fisher.safetensors", "q.safetensors", query_item="3", store="store", lr=1e-4,
                num_draws=8)
    one = score_store("theta0.ckpt", "store", "q.safetensors", "one", 4, 0, 3, {"accelerator": "cpu", "devices": 1})
    two = score_store("theta0.ckpt", "store", "q.safetensors", "two", 4, 0, 3,
                      {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    assert {p.name[:7] for p in (tmp_path / "two" / "parts").glob("part-*")} == {"part-r0", "part-r1"}
    a, b = one.sort_values("index"), two.sort_values("index")
    np.testing.assert_allclose(a["score"], b["score"], rtol=0, atol=1e-6 * float(a["baseline_loss"].max()))
    assert isinstance(two, pd.DataFrame) and two["item_id"].tolist() == one["item_id"].tolist()
