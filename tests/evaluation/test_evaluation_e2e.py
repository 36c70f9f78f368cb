"""A tiny end-to-end self-influence grid and test-to-train comparison (real stages, tiny models)."""
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import tiny_autoencoder_config, make_module, make_store, save_checkpoint

SR = 16000
TINY_AE = tiny_autoencoder_config(latent_dim=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from musicattr.attribution.fisher import FisherPassModule
    from musicattr.models.autoencoder_module import AutoencoderModule
    import lightning as L

    root = tmp_path_factory.mktemp("eval")
    n = 12
    store = make_store(root / "store", n=n, text_dim=384)
    folder = root / "audio_folder"
    (folder / "audio").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i, r in enumerate(store.items.itertuples()):
        t = np.arange(int(r.duration_s * SR)) / SR
        wave = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(folder / r.file_name, wave, SR)
        row = {"file_name": r.file_name, "caption": r.caption}
        if i in (0, 10, 11):
            row["planted_group"] = "audio/track000.wav"
        rows.append(row)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
    torch.manual_seed(0)
    ae = AutoencoderModule(TINY_AE)
    ae_path = root / "ae.ckpt"
    torch.save({"hyper_parameters": {"model_config": TINY_AE}, "state_dict": ae.state_dict()}, ae_path)
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    manifest.update(folder=str(folder), autoencoder=str(ae_path), text_encoder="minilm")
    (root / "store" / "manifest.json").write_text(json.dumps(manifest))
    ckpt = save_checkpoint(make_module(text_dim=384), root / "theta0.ckpt")
    fisher = root / "fisher.safetensors"
    L.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False, inference_mode=False,
              enable_progress_bar=False).predict(FisherPassModule(ckpt, str(root / "store"), str(fisher), num_draws=2))
    return {"root": root, "store": str(root / "store"), "ckpt": ckpt, "fisher": str(fisher), "n": n}


@pytest.mark.slow
def test_tiny_grid_writes_table1_and_resumes(setup, monkeypatch):
    from musicattr.evaluation import self_influence

    out = setup["root"] / "grid"
    configs = [{"target": "all", "strategy": "mixed", "lr": 1e-5, "steps": 1},
               {"target": "to_kv", "strategy": "both", "lr": 1e-5, "steps": 1}]
    kw = dict(num_targets=2, configs=configs, num_draws=8, score_draws=2, fd_samples=2, fd_steps=2, top_k=3,
              use_wandb=False)
    table = self_influence.run_grid(setup["ckpt"], setup["store"], setup["fisher"], str(out), **kw)
    assert len(table) == 2 and set(table["target"]) == {"all", "to_kv"}
    assert table["R(z_tar)"].between(1, setup["n"]).all()
    assert table["R_rel"].between(1, setup["n"]).all()  # the relative score ranks the same runs
    assert {"sim_top3[aisfx]", "sim_bot3[aisfx]", "FD[aisfx]"} <= set(table.columns)
    assert np.isfinite(table["FD[aisfx]"]).all()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4
    targets = json.loads((out / "setup.json").read_text())["targets"]
    assert not set(targets) & {"audio/track010.wav", "audio/track011.wav"}  # planted copies are never targets
    md = (out / "table1.md").read_text()
    assert "| all | ✓ |  |" in md and "aisfx" in md and "R rel" in md
    # resume: a rerun recomputes no (target, config) pair
    calls = []
    monkeypatch.setattr(self_influence, "run_unlearn", lambda *a, **k: calls.append(a))
    self_influence.run_grid(setup["ckpt"], setup["store"], setup["fisher"], str(out), **kw)
    assert calls == []


@pytest.mark.slow
def test_tiny_comparison_writes_correlations_recall_and_figure(setup):
    from musicattr.evaluation.test_to_train import run_comparison

    out = setup["root"] / "compare"
    summary = run_comparison(setup["ckpt"], setup["store"], setup["fisher"], str(out), prompts=["a low tone"],
                             durations=[1.0], lr=1e-5, num_draws=8, score_draws=2, gen_steps=2, use_wandb=False)
    assert summary["queries"] == 2 and summary["planted_queries"] == 1
    for key in ("pearson[all-against-all[aisfx]]", "spearman[average[aisfx]]", "recall_unlearning@1",
                "recall_all-against-all[aisfx]@10", "recall_unlearning-relative@1",
                "pearson[unlearning-relative~all-against-all[aisfx]]"):
        assert key in summary, key
    assert -1 <= summary["pearson[all-against-all[aisfx]]"] <= 1
    assert (out / "figure1.png").stat().st_size > 10_000
    table = pd.read_parquet(out / "queries" / "q000" / "all-against-all.parquet")
    assert len(table) == setup["n"] and list(table["rank"]) == list(range(1, setup["n"] + 1))
