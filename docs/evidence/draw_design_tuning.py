"""Draw-design tuning on one query (the tuning set: bank query q003): two draw seeds (11, 12) under one timestep design,
per-item or shared draws. Usage: python docs/evidence/draw_design_tuning.py q003 64 stratified-8 shared,independent"""
import sys, json, numpy as np, torch
from scipy.stats import spearmanr
torch.set_num_threads(1)
from musicattr.attribution.unlearn import load_unlearned
from musicattr.data.datamodules import collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.models.sat_task import SATDiffusionTask
ckpt, store_dir, T = "assets/bank/demo/model.ckpt", "runs/demo/store", int(sys.argv[2]) if len(sys.argv) > 2 else 32
qid = sys.argv[1]; design = sys.argv[3]; designs = [s == "shared" for s in sys.argv[4].split(",")]
store = LatentStore(store_dir); task = SATDiffusionTask(timesteps=design); model = task.load(ckpt)
tensors, meta = load_unlearned(f"runs/demo/benchmark/compare/queries/{qid}/unlearned.safetensors")
named = dict(task.net(model).named_parameters()); orig = {k: named[k].detach().clone() for k in tensors}
def taus(seed, shared):
    out = []
    with torch.no_grad():
        for s in range(0, len(store), 16):
            b = collate_items([store[p] for p in range(s, min(len(store), s + 16))])
            if shared:
                b = {**b, "item_id": ["shared"] * len(b["item_id"])}
            for k, v in tensors.items(): named[k].data = v.to(named[k].dtype)
            lu = task.draw_losses(model, b, seed, T, namespace="score/")
            for k in tensors: named[k].data = orig[k]
            l0 = task.draw_losses(model, b, seed, T, namespace="score/")
            out.append((lu - l0).numpy())
    return np.concatenate(out)
def shares(tau):
    p = np.clip(tau, 0, None); return p / p.sum()
res = {}
for shared in designs:
    d = {s: taus(s, shared) for s in (11, 12)}
    a, b = d[11].mean(1), d[12].mean(1)
    top = lambda x: set(np.argsort(-x)[:10])
    r = {"spearman": float(spearmanr(a, b).statistic), "top10": len(top(a) & top(b)),
         "share_l1": float(np.abs(shares(a) - shares(b)).sum()),
         "per_draw_var": float(d[11].var(1, ddof=1).mean())}
    res["shared" if shared else "independent"] = r
    print(qid, "shared" if shared else "independent", r, flush=True)
json.dump(res, open(f"docs/evidence/draw_design_{qid}_T{T}_{design}.json", "w"))
