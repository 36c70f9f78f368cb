"""The attribution task seam: a second task (tests/eps_task.py: a small convolutional denoiser that is not a
stable-audio-tools model, epsilon prediction, a linear variance-preserving schedule), chosen by class path,
runs `musicattr fisher`, unlearning and `musicattr attribute` with no change to those modules. Each result is
checked against the same quantity computed here from the bare network (not through the task)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cli, make_store
from musicattr.attribution.fisher import load_fisher
from musicattr.attribution.loss import make_draws
from musicattr.attribution.unlearn import load_unlearned, run_unlearn
from musicattr.data.latent_store import LatentStore
from eps_task import EpsilonTask, TinyDenoiser, save_eps_checkpoint


N_ITEMS, T_FISHER, K_UNLEARN, T_SCORE = 8, 3, 6, 4
TASK = "eps_task.EpsilonTask"
TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", "lightning"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A store, a TinyDenoiser checkpoint, its Fisher (`musicattr fisher`) and one unlearned item."""
    d = tmp_path_factory.mktemp("eps")
    make_store(d / "store", n=N_ITEMS)
    save_eps_checkpoint(d / "eps.ckpt")
    cli(["fisher", "--model.checkpoint", "eps.ckpt", "--model.task", TASK, "--model.out", "fisher.safetensors",
         "--model.num_draws", T_FISHER, "--model.flush_every", 1, "--data.store", "store", "--data.batch_size", 3,
         *TRAINER], d)
    return d


def bare_model(d, tensors=None) -> TinyDenoiser:
    ckpt = torch.load(d / "eps.ckpt", weights_only=True)
    model = TinyDenoiser(**ckpt["config"])
    model.load_state_dict({**ckpt["state_dict"], **(tensors or {})})
    return model


def hand_loss(model, item: dict, key: str, seed: int, draws, mask: bool = False) -> torch.Tensor:
    """1/T sum_j mean over (channels x counted frames) of (eps_theta(sqrt(1-t) z + sqrt(t) eps, t) - eps)^2,
    t_j one of 1000 discrete timesteps."""
    z = item["latents"][None]
    total = 0.0
    for j in draws:
        u, eps = make_draws(seed, [key], [j], tuple(z.shape[1:]))  # the draw's uniform, and its noise
        t, eps = (torch.floor(u[:, 0] * 1000) + 1) / 1001, eps[:, 0]  # the task's 1000 discrete timesteps
        z_t = torch.sqrt(1 - t) * z + torch.sqrt(t) * eps
        se = (model(z_t, t, item["text_emb"][None]) - eps).pow(2).mean(1)[0]
        total = total + (se[: item["valid_frames"]].mean() if mask else se.mean())
    return total / len(draws)


def test_fisher_of_the_second_task(work):
    fisher, meta = load_fisher(str(work / "fisher.safetensors"))
    assert meta["task"] == TASK and meta["num_items"] == N_ITEMS and meta["num_draws"] == T_FISHER
    model = bare_model(work)
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("inp", "mid", "out")]
    assert sorted(fisher) == sorted(names)  # the task's group 'all': its three convolutions
    params = dict(model.named_parameters())
    ref = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in names}
    store = LatentStore(work / "store")
    for pos in range(N_ITEMS):
        item = store[pos]
        for j in range(T_FISHER):
            loss = hand_loss(model, item, "fisher/" + item["item_id"], 0, [j])
            for k, g in zip(names, torch.autograd.grad(loss, [params[k] for k in names])):
                ref[k] += g.double().pow(2)
    for k in names:
        expected = ref[k] / (N_ITEMS * T_FISHER)
        assert float(expected.abs().max()) > 0
        torch.testing.assert_close(fisher[k].double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_unlearning_and_scoring_of_the_second_task(work):
    item_id = "audio/track002.wav"
    meta = run_unlearn(str(work / "eps.ckpt"), str(work / "fisher.safetensors"), str(work / "q.safetensors"),
                       query_item=item_id, store=str(work / "store"), lr=1e-2, num_draws=K_UNLEARN, target="mid",
                       strategy="mixed", damping=1e-3, draws_per_forward=4, task=EpsilonTask())
    assert meta["task"] == {"task": "eps_task.EpsilonTask", "timesteps": "discrete-1000"}
    assert meta["changed_elements"] > 0
    tensors, _ = load_unlearned(str(work / "q.safetensors"))
    assert set(tensors) == {"mid.weight", "mid.bias"}
    # Eq. 2 by hand: the gradient of the masked query loss over the 'unlearn/<id>' draws
    model = bare_model(work)
    store = LatentStore(work / "store")
    item = store[store.resolve(item_id)]
    params = dict(model.named_parameters())
    loss = hand_loss(model, item, "unlearn/" + item_id, 0, range(K_UNLEARN), mask=True)
    grads = dict(zip(tensors, torch.autograd.grad(loss, [params[k] for k in tensors])))
    fisher, _ = load_fisher(str(work / "fisher.safetensors"))
    lam = 1e-3 * float(sum(fisher[k].double().sum() for k in tensors)) / sum(fisher[k].numel() for k in tensors)
    for k, v in tensors.items():
        step = 1e-2 / N_ITEMS * grads[k].double() / (fisher[k].double() + lam)
        torch.testing.assert_close(v.double(), params[k].detach().double() + step, rtol=0,
                                   atol=1e-3 * float(step.abs().max()))
    # Eq. 1 with `musicattr attribute`: tau_i = L(z_i, theta_u) - L(z_i, theta0), bare-id draws, M_L off
    cli(["attribute", "--model.checkpoint", "eps.ckpt", "--model.task", TASK, "--model.unlearned", "q.safetensors",
         "--model.out_dir", "attr", "--model.num_draws", T_SCORE, "--model.relative", "true",
         "--data.store", "store", "--data.batch_size", 3, *TRAINER], work)
    df = pd.read_parquet(work / "attr" / "scores.parquet").sort_values("index")
    unlearned = bare_model(work, tensors)
    with torch.no_grad():
        base = [float(hand_loss(model, store[p], store[p]["item_id"], 0, range(T_SCORE))) for p in range(N_ITEMS)]
        unl = [float(hand_loss(unlearned, store[p], store[p]["item_id"], 0, range(T_SCORE))) for p in range(N_ITEMS)]
    np.testing.assert_allclose(df["baseline_loss"], base, rtol=1e-5)
    np.testing.assert_allclose(df["unlearned_loss"], unl, rtol=1e-5)
    tau = np.array(unl) - np.array(base)
    np.testing.assert_allclose(df["score"], tau, rtol=0, atol=1e-5 * max(base))
    assert int(df.loc[df["item_id"] == item_id, "rank"].iloc[0]) <= 2  # the unlearned item rises the most
    assert np.isfinite(df["relative_score"]).all()
