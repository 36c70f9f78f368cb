"""``musicattr counterfactual``: do the attribution scores predict what the model loses without those tracks?

A campaign retrains the DiT on subsets of the latent store (``retrain``), measures each retrained model's
query losses (``measure``) and reports, for every method of a ``musicattr compare`` run:

    lds          the linear datamodeling score over M random alpha-subsets, and its seed-noise floor (``lds``)
    leave-k-out  the query's loss increase without each method's top-K against K random items (``leave_k_out``)

The campaign is a list of independent retrains (``plan-<experiments>.csv``; see ``subsets``). ``plan: true``
writes it and estimates its run time from a few measured training steps; ``only: i`` runs retrain i alone (one
task of a cluster job array, e.g. ``--only $SLURM_ARRAY_TASK_ID`` with ``--trainer.strategy ddp``); without either,
every unfinished retrain runs in turn (a progress bar with the ETA over all retrains' steps), then the tables
are written. Finished retrains and measurements are reused, so an interrupted campaign continues where it
stopped.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from musicattr.atomic import atomic_write_json, atomic_write_text
from musicattr.attribution.task import AttributionTask, resolve_task
from musicattr.counterfactual.measure import cached, loss_keys, measure_losses, measure_planted, planted_keys
from musicattr.attribution.methods import default_methods
from musicattr.counterfactual.methods import RANDOM, method_scores, parse_methods
from musicattr.counterfactual.queries import Query, read_queries, select_queries
from musicattr.counterfactual.recipe import Recipe, recipe_from_checkpoint
from musicattr.counterfactual.retrain import MODEL, StepProgress, fit_retrain, finished
from musicattr.counterfactual.subsets import Plan, PlannedRetrain, lds_subsets, random_scores, top_k
from musicattr.data.latent_store import LatentStore

log = logging.getLogger(__name__)
EXPERIMENTS = ("lds", "leave-k-out")


@dataclass
class LDSSettings:
    """The LDS experiment (see ``counterfactual.lds``).

    Args:
        subsets: M, random subsets of the store, the same for every method and query (D-TRAK: 64).
        alpha: the fraction of the store each subset keeps (D-TRAK: 0.5).
        seeds: training seeds of every subset; the query loss is their mean (D-TRAK: 3 seeds).
        noise_seed: the seed-noise floor retrains the first ``noise_subsets`` subsets again with this seed.
        noise_subsets: how many subsets the noise floor retrains (at least 3 for its rank correlation).
        subset_seed: the seed that draws the subsets.
        queries: None for every query of the compare run, a list of query ids, or {kind: n} for the first n
            queries of each kind (generated, planted, training).
    """

    subsets: int = 16
    alpha: float = 0.5
    seeds: list[int] = field(default_factory=lambda: [0])
    noise_seed: int = 1
    noise_subsets: int = 4
    subset_seed: int = 0
    queries: list[str] | dict[str, int] | None = None


@dataclass
class LeaveKOutSettings:
    """The leave-K-out experiment (see ``counterfactual.leave_k_out``).

    Args:
        k: K, the items each removal leaves out: a method's top-K for a query, or K random items.
        seeds: training seeds; every removal and theta0' are retrained with each, and random-K draws one set
            per seed.
        queries: None for every query of the compare run, a list of query ids, or {kind: n}.
        methods: the methods whose top-K are removed (None: every method); random-K is always run.
        planted_check: for planted prompts, generate from every leave-K-out model and compare the generation
            with the planted track (chroma).
        gen_steps: sampler steps of those generations; cfg_scale: their classifier-free guidance scale.
    """

    k: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    queries: list[str] | dict[str, int] | None = None
    methods: list[str] | None = None
    planted_check: bool = True
    gen_steps: int = 25
    cfg_scale: float = 5.0


@dataclass
class Campaign:
    """The plan and what each experiment needs from it."""

    plan: Plan
    context: dict
    queries: list[Query]                     # every query measured (the union of both experiments')
    lds_queries: list[Query] = field(default_factory=list)
    lds_scores: dict[str, np.ndarray] = field(default_factory=dict)   # method -> [Q_lds, N]
    lds_kept: np.ndarray | None = None                                 # [M, N] boolean
    lds_runs: dict[tuple[int, int], PlannedRetrain] = field(default_factory=dict)  # (subset, seed) -> retrain
    lko_queries: list[Query] = field(default_factory=list)
    lko_runs: dict[tuple[str, str, int], PlannedRetrain] = field(default_factory=dict)  # (qid, method, seed)
    lko_references: dict[int, PlannedRetrain] = field(default_factory=dict)             # seed -> theta0'

    def run_dir(self, out: Path, r: PlannedRetrain) -> Path:
        return out / "retrains" / r.name(self.context)


def build_campaign(experiments, store: LatentStore, compare: str, methods: list[str | dict], recipe: Recipe,
                   lds: LDSSettings, lko: LeaveKOutSettings, seed: int) -> Campaign:
    """Queries, method scores and the deduplicated plan of retrains for the experiments."""
    ids = list(store.items["item_id"].astype(str))
    n = len(ids)
    methods = parse_methods(methods)
    everything = read_queries(compare)
    c = Campaign(Plan(), {"store_fingerprint": store.fingerprint, "recipe": recipe.fingerprint()}, [])
    for name, seeds in (("lds", lds.seeds), ("leave_k_out", lko.seeds)):
        if not seeds:
            raise ValueError(f"{name}.seeds is empty; fix: give at least one training seed, e.g. [0]")
    if "lds" in experiments:
        if lds.noise_seed == lds.seeds[0]:
            raise ValueError(f"lds.noise_seed {lds.noise_seed} is the first LDS seed; fix: choose another seed for "
                             "the noise floor")
        c.lds_queries = select_queries(everything, lds.queries)
        c.lds_scores = method_scores(methods, compare, c.lds_queries, ids, random_seed=seed)
        removed = lds_subsets(ids, lds.subsets, lds.alpha, lds.subset_seed)
        c.lds_kept = np.ones((len(removed), n), dtype=bool)
        position = {item: i for i, item in enumerate(ids)}
        for j, r in enumerate(removed):
            c.lds_kept[j, [position[i] for i in r]] = False
        for j, r in enumerate(removed):
            for s in lds.seeds:
                c.lds_runs[j, s] = c.plan.add(r, s, f"lds subset {j}")
        for j, r in enumerate(removed[:lds.noise_subsets]):
            c.lds_runs[j, lds.noise_seed] = c.plan.add(r, lds.noise_seed, f"lds noise subset {j}")
    if "leave-k-out" in experiments:
        c.lko_queries = select_queries(everything, lko.queries)
        chosen = [m for m in methods if m.name != RANDOM and (lko.methods is None or m.name in lko.methods)]
        unknown = sorted(set(lko.methods or []) - {m.name for m in methods})
        if unknown:
            raise ValueError(f"leave_k_out.methods {unknown} are not among the methods; fix: name methods of `methods`")
        scores = method_scores(chosen, compare, c.lko_queries, ids)
        for s in lko.seeds:
            c.lko_references[s] = c.plan.add((), s, "reference theta0'")
            rand = c.plan.add(top_k(random_scores(n, s), ids, lko.k), s, f"random-{lko.k}")
            for qi, q in enumerate(c.lko_queries):
                c.lko_runs[q.query_id, RANDOM, s] = rand
                for m, sc in scores.items():
                    c.lko_runs[q.query_id, m, s] = c.plan.add(top_k(sc[qi], ids, lko.k), s,
                                                              f"top-{lko.k} {m} {q.query_id}")
    c.queries = [q for q in everything if q in c.lds_queries or q in c.lko_queries]
    return c


def plan_path(out: Path, experiments, suffix: str) -> Path:
    """``plan-lds.csv``, ``plan-leave-k-out.json``, ``plan-lds+leave-k-out.csv``: one plan per choice of experiments,
    so the job arrays of ``make lds`` and ``make leave-k-out`` never read each other's numbering."""
    return out / f"plan-{'+'.join(e for e in EXPERIMENTS if e in experiments)}.{suffix}"


def write_plan(out: Path, c: Campaign, recipe: Recipe, experiments) -> Path:
    rows = [{"index": i, "name": r.name(c.context), "seed": r.seed, "removed": len(r.removed),
             "purposes": r.purposes} for i, r in enumerate(c.plan)]
    atomic_write_json(plan_path(out, experiments, "json"), {"recipe": asdict(recipe), "context": c.context,
                                                            "retrains": rows})
    atomic_write_text(plan_path(out, experiments, "csv"), "index,name,seed,removed,purposes\n" + "".join(
        f"{r['index']},{r['name']},{r['seed']},{r['removed']},\"{'; '.join(r['purposes'])}\"\n" for r in rows))
    return plan_path(out, experiments, "csv")


def run_counterfactual(checkpoint: str, store: str, compare: str, out_dir: str,
                       experiments: list[str] = ("lds", "leave-k-out"), methods: list[str | dict] | None = None,
                       steps: int | None = None, recipe: dict | None = None, lds: LDSSettings = LDSSettings(),
                       leave_k_out: LeaveKOutSettings = LeaveKOutSettings(), loss_draws: int = 64,
                       mask_loss: bool = False, seed: int = 0, checkpoint_every: int = 100, plan: bool = False,
                       only: int | None = None, probe_steps: int = 5, use_wandb: bool = True,
                       task: AttributionTask | None = None, trainer: dict | None = None) -> dict:
    """Retrain on subsets of the store and validate every method's scores (LDS and leave-K-out).

    Args:
        checkpoint: theta0 from ``musicattr fit``; its fit recipe is every retrain's recipe.
        store: the latent store theta0 was trained on.
        compare: the out_dir of a ``musicattr compare`` run: the queries and their score tables.
        out_dir: the campaign's folder (retrains/, the plans, the tables).
        experiments: ``lds`` and/or ``leave-k-out``.
        methods: registered method names or {name, table, column, optional} (see ``counterfactual.methods``);
            default: the registry's defaults (Eq. 1, relative, the index and its relative score (optional), the two
            aisfx similarity baselines, random).
        steps: optimizer steps of every retrain and of theta0' (default: theta0's).
        recipe: other overrides of theta0's recipe (lr, warmup_steps, batch_size, gradient_clip_val, ...).
        lds: the LDS experiment's settings.
        leave_k_out: the leave-K-out experiment's settings.
        loss_draws: T, the fixed (t, eps) draws of each query loss.
        mask_loss: average the query loss over the non-padded frames only.
        seed: the seed of the query-loss draws, of the random method's LDS scores and of the planted generations.
        checkpoint_every: steps between the resume checkpoints of a retrain.
        plan: write the plan and estimate the run time from measured costs, then stop.
        only: run retrain ``only`` of the plan (plan-<experiments>.csv), then stop: one task of a job array; the
            tables are written by a run without ``only``.
        probe_steps: training steps timed for the estimate of ``plan``.
        use_wandb: log the tables to wandb (offline unless WANDB_MODE says otherwise).
        task: the attribution task whose loss measures the queries (default: the SAT DiT); the retrains
            themselves fit ``musicattr fit``'s DiffusionModule.
        trainer: Trainer options of the retrains (``--trainer.*``: accelerator, devices, strategy, ...).
    """
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown or not experiments:
        raise ValueError(f"experiments {list(experiments)}: choose among {list(EXPERIMENTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = LatentStore(store)
    rec = recipe_from_checkpoint(checkpoint, steps, recipe)
    task = resolve_task(task)
    c = build_campaign(experiments, s, compare, methods or default_methods(), rec, lds, leave_k_out, seed)
    plan_file = write_plan(out, c, rec, experiments)
    log.info("counterfactual: %d retrains (%s; %s), %d queries", len(c.plan), ", ".join(experiments), rec.describe(),
             len(c.queries))
    measure = _Measure(c, s, store, task, seed, loss_draws, mask_loss, leave_k_out, trainer)
    if plan:
        return estimate(out, c, rec, store, measure, trainer, probe_steps, checkpoint, plan_file)
    if only is not None:
        if not 0 <= only < len(c.plan):
            raise IndexError(f"only {only}: the plan has retrains 0..{len(c.plan) - 1} (see {plan_file})")
        r = c.plan.retrains[only]
        model = fit_retrain(c.run_dir(out, r), rec, store, r.removed, r.seed, r.key(c.context), trainer,
                            checkpoint_every=checkpoint_every, progress_bar=True)
        if model is not None:
            measure(c.run_dir(out, r), r)
            log.info("counterfactual: retrain %d (%s) finished and measured: %s", only, "; ".join(r.purposes),
                     c.run_dir(out, r))
        return {"retrain": r.name(c.context), "purposes": r.purposes}
    run_all(out, c, rec, store, measure, trainer, checkpoint_every, plan_file)
    from musicattr.counterfactual.report import write_report

    theta0 = measure.theta0(out, checkpoint)
    return write_report(out, c, measure, theta0, experiments, lds, leave_k_out, rec, use_wandb)


class _Measure:
    """Measures a finished retrain (query losses, planted chroma) and reads the measurements back."""

    def __init__(self, c: Campaign, store: LatentStore, store_path: str, task: AttributionTask, seed: int,
                 loss_draws: int, mask: bool, lko: LeaveKOutSettings, trainer: dict | None):
        from musicattr.evaluation.common import unlearn_device
        from musicattr.fingerprint import file_fingerprint

        self.c, self.store, self.store_path, self.task = c, store, store_path, task
        self.seed, self.loss_draws, self.mask, self.device = seed, loss_draws, mask, unlearn_device(trainer)
        self.keys = loss_keys(c.queries, store_path, seed, loss_draws, mask, task)
        planted = [q for q in c.lko_queries if q.kind == "planted"] if lko.planted_check else []
        self.planted = planted
        self.lko_runs = {id(r) for r in [*c.lko_runs.values(), *c.lko_references.values()]}
        self.gen = {"gen_steps": lko.gen_steps, "cfg_scale": lko.cfg_scale, "seed": seed,
                    "autoencoder": file_fingerprint(store.manifest["autoencoder"]) if planted else None}
        self.planted_keys = planted_keys(planted, store_path, self.gen)

    def planted_for(self, r: PlannedRetrain) -> list[Query]:
        return self.planted if id(r) in self.lko_runs else []

    def _planted_keys_of(self, planted: list[Query]) -> dict[str, dict]:
        return {q.query_id: self.planted_keys[q.query_id] for q in planted}

    def done(self, run_dir: Path, r: PlannedRetrain) -> bool:
        return finished(run_dir) and cached(run_dir, "losses.json", self.keys, "loss") is not None and \
            cached(run_dir, "planted.json", self._planted_keys_of(self.planted_for(r)), "chroma") is not None

    def query_losses(self, run_dir: Path, model) -> dict[str, float]:
        """The query losses of ``model``, measured into (or read from) ``run_dir``."""
        return measure_losses(run_dir, self.task, model, self.c.queries, self.store_path, self.keys, self.seed,
                              self.loss_draws, self.mask, self.device)

    def planted_chroma(self, run_dir: Path, planted: list[Query], model) -> None:
        """The planted prompts' generations of ``model``, and their chroma, into ``run_dir``."""
        measure_planted(run_dir, model.to(self.device), planted, self.store, self._planted_keys_of(planted),
                        self.gen["gen_steps"], self.gen["cfg_scale"], self.seed)

    def __call__(self, run_dir: Path, r: PlannedRetrain) -> None:
        model = self.task.load(str(run_dir / MODEL))
        self.query_losses(run_dir, model)
        if self.planted_for(r):
            self.planted_chroma(run_dir, self.planted_for(r), model)

    def theta0(self, out: Path, checkpoint: str) -> dict[str, float]:
        """The query losses of theta0 itself (for context: theta0' follows the campaign's recipe, which may be
        shorter), cached in ``theta0/<its fingerprint>/losses.json``."""
        from musicattr.fingerprint import file_fingerprint

        run_dir = out / "theta0" / file_fingerprint(checkpoint)
        done = cached(run_dir, "losses.json", self.keys, "loss")
        if done is not None:
            return done
        return self.query_losses(run_dir, self.task.load(checkpoint))

    def losses(self, run_dir: Path) -> dict[str, float]:
        return cached(run_dir, "losses.json", self.keys, "loss")

    def chroma(self, run_dir: Path) -> dict[str, float]:
        return cached(run_dir, "planted.json", self.planted_keys, "chroma") or {}


def run_all(out: Path, c: Campaign, recipe: Recipe, store: str, measure: _Measure, trainer: dict | None,
            checkpoint_every: int, plan_file: Path) -> None:
    """Every retrain of the plan that is not finished and measured, in turn, with one progress bar over all
    their steps (tqdm's ETA) and a log line per retrain above it."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    todo = [r for r in c.plan if not measure.done(c.run_dir(out, r), r)]
    if not todo:
        log.info("counterfactual: every retrain of the plan is finished and measured")
        return
    fits = sum(not finished(c.run_dir(out, r)) for r in todo)
    if fits and str((trainer or {}).get("strategy")).startswith("ddp"):
        raise ValueError(f"{fits} retrains to fit, and a campaign fits them one after another in this process; for "
                         "several processes per retrain run each as its own job with --only I --trainer.strategy ddp "
                         f"(I = 0..{len(c.plan) - 1}, see {plan_file}), then this command again for the tables")
    log.info("counterfactual: %d of %d retrains to run (%d to fit, %d steps each)", len(todo), len(c.plan), fits,
             recipe.steps)
    quiet = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")}
    for name in quiet:  # Lightning's banner at every fit would bury the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.time()
    try:
        with tqdm(total=fits * recipe.steps, unit="step", desc="retrains", dynamic_ncols=True) as bar, \
                logging_redirect_tqdm(loggers=[logging.getLogger("musicattr")]):
            for k, r in enumerate(todo):
                run_dir = c.run_dir(out, r)
                fitted = not finished(run_dir)
                t0 = time.time()
                fit_retrain(run_dir, recipe, store, r.removed, r.seed, r.key(c.context), trainer,
                            callbacks=[StepProgress(bar)], checkpoint_every=checkpoint_every)
                t1 = time.time()
                measure(run_dir, r)
                t2 = time.time()
                timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").exists() else {}
                atomic_write_json(run_dir / "timing.json", {**timing, **({"fit_s": t1 - t0} if fitted else {}),
                                                            "measure_s": t2 - t1})
                bar.set_postfix_str(f"retrain {k + 1}/{len(todo)}")
                log.info("[counterfactual %d/%d] %s (%s): fit %.0f s, measured %.0f s; %.1f min so far, about %.0f "
                         "min left", k + 1, len(todo), run_dir.name,
                         "; ".join(r.purposes[:3]) + (" ..." if len(r.purposes) > 3 else ""), t1 - t0, t2 - t1,
                         (t2 - start) / 60, (t2 - start) / (k + 1) * (len(todo) - k - 1) / 60)
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def estimate(out: Path, c: Campaign, recipe: Recipe, store_path: str, measure: _Measure,
             trainer: dict | None, probe_steps: int, checkpoint: str, plan_file: Path) -> dict:
    """Time a short fit of the recipe (``probe_steps`` steps after 2 warm-up steps), one measurement of the query
    losses and one planted generation (both on theta0), and estimate the campaign's run time from them:

        unfinished fits x (steps x s/step + start-up) + unmeasured retrains x losses + planted generations x each"""
    import lightning as L

    from musicattr.counterfactual.retrain import retrain_trainer
    from musicattr.data.datamodules import LatentDataModule
    from musicattr.models.diffusion_module import DiffusionModule

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter())

    warm, clock = 2, Clock()
    probe = Recipe(recipe.module, warm + probe_steps, recipe.batch_size, recipe.gradient_clip_val)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        L.seed_everything(0, verbose=False)
        t = retrain_trainer(Path(tmp), probe, trainer, callbacks=[clock], checkpoint_every=10 ** 9)
        t.fit(DiffusionModule(**recipe.module), datamodule=LatentDataModule(store_path, batch_size=recipe.batch_size))
        fit_seconds = time.perf_counter() - t0
    per_step = (clock.times[-1] - clock.times[warm - 1]) / probe_steps
    per_fit = max(0.0, fit_seconds - probe.steps * per_step)  # start-up: model, data, Trainer
    per_generation = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = measure.task.load(checkpoint)
        measure.query_losses(Path(tmp), model)
        per_losses = time.perf_counter() - t0
        if measure.planted:
            t0 = time.perf_counter()
            measure.planted_chroma(Path(tmp), measure.planted[:1], model)
            per_generation = time.perf_counter() - t0
    fits = sum(not finished(c.run_dir(out, r)) for r in c.plan)
    todo = [r for r in c.plan if not measure.done(c.run_dir(out, r), r)]
    generations = sum(len(measure.planted_for(r)) for r in todo)
    seconds = fits * (recipe.steps * per_step + per_fit) + len(todo) * per_losses + generations * per_generation
    summary = {"retrains": len(c.plan), "to_fit": fits, "to_measure": len(todo), "steps": recipe.steps,
               "seconds_per_step": per_step, "seconds_per_fit_start": per_fit, "seconds_per_measurement": per_losses,
               "planted_generations": generations, "seconds_per_generation": per_generation,
               "estimated_minutes": seconds / 60, "recipe": recipe.describe()}
    atomic_write_json(out / "estimate.json", summary)
    log.info("counterfactual plan: %d retrains (%d to fit) x (%d steps at %.3f s/step + %.1f s start-up), + %.1f s "
             "of query losses per retrain, + %d planted generations at %.1f s -> about %.0f min; the plan: %s",
             len(c.plan), fits, recipe.steps, per_step, per_fit, per_losses, generations, per_generation, seconds / 60,
             plan_file)
    return summary
