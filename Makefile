# musicattr: `make demo` runs the whole flow on the embedded corpus, `make test` runs the tests.
# Both set up the virtual environment first (idempotent: nothing happens when it is up to date).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONWARNINGS := ignore::UserWarning,ignore::DeprecationWarning,ignore::FutureWarning

CFG := configs/demo
# The run root: configs/demo/run.yaml names it once (runs/demo); `make demo RUN_ROOT=runs/other` moves every
# output of the flow there. Each stage config writes its paths as ${run_root}/...
RUN_ROOT ?= $(shell sed -n 's/^run_root: *//p' $(CFG)/run.yaml)
D := $(RUN_ROOT)
MA := $(VENV)/bin/musicattr
RUN := --run_root $(D)

AE := assets/demo_autoencoder
# The corpus and compare configs (`make heldback` points them at configs/heldback; every other stage keeps $(CFG))
CORPUS_CFG ?= $(CFG)/corpus.yaml
COMPARE_CFG ?= $(CFG)/compare.yaml

.PHONY: all venv demo test test-fast bench reproducibility reproducibility-curve table1 self-influence figure1 report adherence autoencoder clean-demo help \
	lds leave-k-out index index-query index-fidelity two-stage-fidelity heldback index-scale bank bank-plan benchmark benchmark-shipped benchmark-scores peers rehearse

help:
	@echo "make demo     - set up, then run corpus -> encode (shipped autoencoder) -> fit -> fisher -> generate -> unlearn -> attribute -> report"
	@echo "make test     - set up, then run the test suite"
	@echo "make bench    - attribution benchmark (prints figures, writes runs/bench/attribution.json)"
	@echo "make reproducibility - Eq. 1 scored twice with two draw seeds per draw design, and two index builds: Spearman, top-10, share L1"
	@echo "make reproducibility-curve - the draw budget T the reproducibility goal needs, measured on the demo query (REPRO_CURVE_T, REPRO_CURVE_QUERIES)"
	@echo "make table1   - self-influence grid search on the demo model (Table 1)"
	@echo "make self-influence - the best Table 1 row (mixed, all blocks, lr 1e-6) on SI_TARGETS k-means targets"
	@echo "                      (default 16) with SI_DRAWS scoring draws (default 64)"
	@echo "make figure1  - test-to-train comparison with similarity baselines (Figure 1)"
	@echo "make report   - the demo query's listening page with credit shares (runs/demo/report/q000/index.html)"
	@echo "make adherence - does the demo model follow its prompts? planted regeneration and group accuracy"
	@echo "make autoencoder - retrain the demo's log-mel VAE (about 45 min) and export it to $(AE)/"
	@echo "make lds      - retrain on M random half-subsets: the linear datamodeling score of every method (~80 min)"
	@echo "make leave-k-out - retrain without each method's top-K vs K random tracks (~75 min; both side by side)"
	@echo "                CF_ARGS='--plan true' prints the plan and its time estimate instead"
	@echo "make index    - build the attribution index of the demo model (runs/demo/index)"
	@echo "make index-query    - the generated queries against the index in seconds (runs/demo/index_queries)"
	@echo "make index-fidelity - index vs exact unlearning on 8 generated + 8 training queries, k curve"
	@echo "                      (runs/demo/index_fidelity: fidelity.md, k_curve.png)"
	@echo "make two-stage-fidelity - the two-stage query (index top M, exact Eq. 1 on those) against exact Eq. 1"
	@echo "make heldback - the demo flow on a corpus of music21 collections the demo never renders, then"
	@echo "                two-stage-fidelity there (runs/heldback; about an hour)"
	@echo "make index-scale    - the index at the paper's scale (FLOP counts), then at 10^4..10^6 synthetic items:"
	@echo "                      precision fidelity, write, query time, memory, faiss recall (runs/bench/index_scale.json)"
	@echo "make rehearse - every stage (fit .. report) with configs/paper's DiT at the paper's latent shape on the CPU:"
	@echo "                wall time, peak memory, FLOPs, 8-GPU extrapolation (runs/rehearse/rehearse.md)"
	@echo "make bank     - grow the shipped counterfactual bank (assets/bank/demo): one retrain after another, one"
	@echo "                thread, resumable; BANK_ARGS='--commit true' commits each finished retrain's losses;"
	@echo "                BANK_WORKERS=2 runs two retrains side by side (one per core)"
	@echo "make bank-plan - the bank's plan, what is done and the time left"
	@echo "make benchmark - every method's scores shipped in assets/bank/demo/scores against the bank: LDS with"
	@echo "                intervals, paired differences, null, noise ceiling, leave-K-out, group credit; minutes on a"
	@echo "                fresh clone, nothing computed first (runs/demo/benchmark-shipped; BENCHMARK_ARGS adds options)"
	@echo "make benchmark-scores - every method scored afresh on the bank's queries (Fisher, index, compare, the peers"
	@echo "                and the index ensemble: hours; BENCH_WITH=, empty, skips the last two), then the same"
	@echo "                tables (runs/demo/benchmark)"
	@echo "make peers    - EK-FAC influence (kronfluence), TRAK, D-TRAK (traker) and EK-FAC unlearning on the benchmark's"
	@echo "                compare run (one table per query and peer; resumable); then make benchmark-scores includes them"

venv: $(VENV)/.installed

$(VENV)/.installed: requirements/base.txt requirements/nodeps.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (or run make PYTHON=python3)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27"
	$(PY) -m pip install -q -r requirements/base.txt
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The suite with one torch thread per process, then the tests that compare two computation paths (batch
# shapes, cache, processes, DDP ranks; marked `paths`) once more with 2 threads, so that a result that depends
# on shapes or threads shows on any machine.
test: venv
	MUSICATTR_TEST_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider
	MUSICATTR_TEST_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider -m paths

test-fast: venv
	MUSICATTR_TEST_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# ---- the demo flow; each stage reruns only when its inputs changed ----
demo: venv $(D)/report/q000/index.html
	@echo "demo done: audio in $(D)/generated, attribution table $(D)/attribution/q000/scores.parquet"
	@echo "report: $(D)/report/q000/index.html"

$(D)/corpus/metadata.jsonl: $(CORPUS_CFG)
	$(MA) corpus --config $(CORPUS_CFG) $(RUN)

# The demo's autoencoder ships trained in $(AE)/ (weights, config, health, recipe with the corpus
# fingerprint); `make autoencoder` retrains it from the corpus and exports it there.
autoencoder: venv $(D)/corpus/metadata.jsonl
	rm -f $(D)/autoencoder/*.ckpt
	$(MA) autoencoder --config $(CFG)/autoencoder.yaml $(RUN)
	$(PY) -m musicattr.models.autoencoder_export $(D)/autoencoder/last.ckpt $(AE) --folder $(D)/corpus \
		--config $(CFG)/autoencoder.yaml

$(D)/store/index.parquet: $(D)/corpus/metadata.jsonl $(AE)/weights.safetensors $(CFG)/encode.yaml
	rm -rf $(D)/store
	$(MA) encode --config $(CFG)/encode.yaml $(RUN)

$(D)/fit/last.ckpt: $(D)/store/index.parquet $(CFG)/fit.yaml
	rm -f $(D)/fit/*.ckpt
	$(MA) fit --config $(CFG)/fit.yaml $(RUN)

$(D)/fisher.safetensors: $(D)/fit/last.ckpt $(CFG)/fisher.yaml
	$(MA) fisher --config $(CFG)/fisher.yaml $(RUN) --model.overwrite true

$(D)/generated/queries.json: $(D)/fit/last.ckpt $(CFG)/generate.yaml
	$(MA) generate --config $(CFG)/generate.yaml $(RUN)

# EK-FAC factors of theta0 (kronfluence): unlearn.yaml's preconditioner, AbU+ (README "Peers side by side")
$(D)/ekfac/musicattr_ekfac.json: $(D)/fit/last.ckpt $(D)/store/index.parquet $(CFG)/ekfac.yaml
	$(MA) ekfac --config $(CFG)/ekfac.yaml $(RUN)

$(D)/unlearned/q000.safetensors: $(D)/fisher.safetensors $(D)/ekfac/musicattr_ekfac.json $(D)/generated/queries.json \
		$(CFG)/unlearn.yaml
	$(MA) unlearn --config $(CFG)/unlearn.yaml $(RUN)

$(D)/attribution/q000/scores.parquet: $(D)/unlearned/q000.safetensors $(CFG)/attribute.yaml
	$(MA) attribute --config $(CFG)/attribute.yaml $(RUN) --model.overwrite true

$(D)/report/q000/index.html: $(D)/attribution/q000/scores.parquet $(CFG)/report.yaml
	$(MA) report --config $(CFG)/report.yaml $(RUN)

report: venv $(D)/report/q000/index.html

bench: venv $(D)/fit/last.ckpt $(D)/fisher.safetensors
	$(PY) scripts/bench_attribution.py --run_root $(D) --out runs/bench/attribution.json

# ---- reproducibility of Eq. 1 under its random draws (README "Reproducible credit") ----
# The demo query, plus generated queries q001..q008 of `make figure1` when they exist, scored twice with two draw seeds
# under each draw design (timesteps[+shared]:T; the first is the reference of the paired differences), and by two
# indexes built with two scoring seeds; REPRO_DESIGNS overrides the designs. Resumes from its JSON.
REPRO_DESIGNS ?= uniform:32 stratified-8+shared:64 uniform:64
$(D)/index-seed1/index.json: $(D)/fisher.safetensors $(CFG)/index.yaml
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) index --config $(CFG)/index.yaml $(RUN) --model.seed 1 \
		--model.out $(D)/index-seed1 --model.write_caches false --trainer.default_root_dir $(D)/index-seed1

reproducibility: venv $(D)/attribution/q000/scores.parquet $(D)/index/index.json $(D)/index-seed1/index.json
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/reproducibility.py --run_root $(D) \
		--unlearned $(D)/unlearned/q000.safetensors $(sort $(wildcard $(D)/figure1/queries/q00[1-8]/unlearned.safetensors)) \
		--designs $(REPRO_DESIGNS) --indexes $(D)/index $(D)/index-seed1

# The draw budget the reproducibility goal needs, measured: the demo query (and the queries of REPRO_CURVE_QUERIES)
# scored with REPRO_CURVE_T draws of attribute's design under two draw seeds, agreement at every budget T <= T_max
# from the same per-draw losses (cached per chunk under runs/demo/reproducibility/draws/; resumable).
REPRO_CURVE_T ?= 384
REPRO_CURVE_QUERIES ?=
reproducibility-curve: venv $(D)/attribution/q000/scores.parquet
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/reproducibility_curve.py --run_root $(D) \
		--unlearned $(D)/unlearned/q000.safetensors $(REPRO_CURVE_QUERIES) --max_draws $(REPRO_CURVE_T)

# ---- the attribution index (README "The attribution index") ----
$(D)/index/index.json: $(D)/fisher.safetensors $(CFG)/index.yaml
	$(MA) index --config $(CFG)/index.yaml $(RUN)

index: venv $(D)/index/index.json

index-query: venv $(D)/index/index.json $(D)/generated/queries.json
	$(MA) query --config $(CFG)/query.yaml $(RUN)

index-fidelity: venv $(D)/fit/last.ckpt $(D)/fisher.safetensors
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) index-fidelity --config $(CFG)/index-fidelity.yaml $(RUN)

# The two-stage query (`musicattr query --exact_top M`, and with --similar_top M) against exact Eq. 1 on the figure1
# queries of $(D)
two-stage-fidelity: venv $(D)/figure1/comparison.json
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/two_stage_fidelity.py --run_root $(D) --pattern 'q0*' \
		--similar_ms 16 32 --out runs/bench/two_stage_fidelity_$(notdir $(D)).json

# ---- a held-back corpus (issue 21): music21 collections the demo never renders (configs/heldback/corpus.yaml),
# the demo's flow on it (its own theta0, Fisher and index at configs/demo's settings), Figure 1's queries and the
# two-stage query's fidelity there: nothing tuned on the demo is retuned. About an hour on one core.
HB := $(shell sed -n 's/^run_root: *//p' configs/heldback/run.yaml)
heldback: venv
	$(MAKE) RUN_ROOT=$(HB) CORPUS_CFG=configs/heldback/corpus.yaml COMPARE_CFG=configs/heldback/compare.yaml \
		two-stage-fidelity

index-scale: venv
	$(PY) scripts/index_paper_scale.py --bench runs/bench/attribution.json --out runs/bench/index_paper_scale.json
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/index_scale.py --max_gb $${INDEX_SCALE_GB:-34} \
		--out runs/bench/index_scale.json  # 10^6 items at 2^15: 32.8 GB of shards (capped at 90% of free disk), ~40 min

clean-demo:
	rm -rf $(D)

table1: venv $(D)/fit/last.ckpt $(D)/fisher.safetensors
	$(MA) evaluate --config $(CFG)/evaluate.yaml $(RUN)

SI_TARGETS ?= 16
SI_DRAWS ?= 64
self-influence: venv $(D)/fit/last.ckpt $(D)/fisher.safetensors
	$(MA) evaluate --config $(CFG)/evaluate.yaml $(RUN) --out_dir $(D)/self_influence --num_targets $(SI_TARGETS) \
		--scoring.draws $(SI_DRAWS) \
		--configs '[{target: all, strategy: mixed, lr: 1.0e-6, steps: 1}]'

figure1: venv $(D)/fit/last.ckpt $(D)/fisher.safetensors $(D)/index/index.json
	$(MA) compare --config $(COMPARE_CFG) $(RUN)

adherence: venv $(D)/fit/last.ckpt
	$(MA) adherence --config $(CFG)/adherence.yaml $(RUN)

# ---- counterfactual validation: retrains on subsets of the store (configs/demo/counterfactual.yaml) ----
# Both read the queries and every method's scores from the figure1 compare run; both resume where they stopped.
CF_ARGS ?=
$(D)/figure1/comparison.json: $(D)/fit/last.ckpt $(D)/fisher.safetensors $(D)/index/index.json $(COMPARE_CFG)
	$(MA) compare --config $(COMPARE_CFG) $(RUN)

lds: venv $(D)/figure1/comparison.json
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) counterfactual --config $(CFG)/counterfactual.yaml $(RUN) --experiments '[lds]' $(CF_ARGS)

leave-k-out: venv $(D)/figure1/comparison.json
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) counterfactual --config $(CFG)/counterfactual.yaml $(RUN) --experiments '[leave-k-out]' $(CF_ARGS)

# ---- the counterfactual bank (configs/demo/bank.yaml) and the benchmark against it (configs/demo/benchmark.yaml) ----
# The bank ships in $(BANK) and grows: `make bank` continues from the retrains it holds (one thread per worker;
# BANK_WORKERS=2 runs two side by side, each claiming its next retrain in $(D)/bank/claims).
# `make benchmark` checks the scores shipped in $(BANK)/scores against the bank (minutes, nothing computed);
# `make benchmark-scores` first scores every method afresh on the benchmark model and the bank's queries (Fisher,
# index, compare, the peers, the index ensemble). No retraining in either.
BANK := assets/bank/demo
BD := $(D)/benchmark
BANK_ARGS ?=
BANK_WORKERS ?= 1
bank: venv $(D)/store/index.parquet
	@pids=""; for w in $$(seq $(BANK_WORKERS)); do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) bank --config $(CFG)/bank.yaml $(RUN) $(BANK_ARGS) & \
		pids="$$pids $$!"; sleep 5; \
	done; status=0; for p in $$pids; do wait $$p || status=1; done; exit $$status

# Every method's shipped scores ($(BANK)/scores) against the bank: the benchmark's tables in minutes on a fresh clone,
# nothing computed first (BENCHMARK_ARGS adds options, e.g. --half report --subsets 48). benchmark-shipped: its
# earlier name.
BENCHMARK_ARGS ?=
benchmark-shipped: benchmark
benchmark: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) benchmark --config $(CFG)/benchmark.yaml $(RUN) --store null \
		--scores $(BANK)/scores --out_dir $(D)/benchmark-shipped $(BENCHMARK_ARGS)

bank-plan: venv $(D)/store/index.parquet
	$(MA) bank --config $(CFG)/bank.yaml $(RUN) --plan true

$(BD)/fisher.safetensors: $(BANK)/model.ckpt $(D)/store/index.parquet $(CFG)/fisher.yaml
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) fisher --config $(CFG)/fisher.yaml $(RUN) \
		--model.checkpoint $(BANK)/model.ckpt --model.out $@ --model.overwrite true --trainer.default_root_dir $(BD)/fisher

$(BD)/index/index.json: $(BD)/fisher.safetensors $(CFG)/index.yaml
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) index --config $(CFG)/index.yaml $(RUN) \
		--model.checkpoint $(BANK)/model.ckpt --model.fisher $(BD)/fisher.safetensors --model.out $(BD)/index \
		--trainer.default_root_dir $(BD)/index

# compare runs once per batch of the bank's queries: $(BD)/compare, then $(BD)/compare/batch-<b> for a later batch
# (`make bank` appends them); each reuses what it has made.
BATCH_DIRS = $(BD)/compare $$(ls -d $(BD)/compare/batch-* 2>/dev/null | grep -E '/batch-[0-9]+$$')
# --prepare places each batch's queries (and its listing, bank_queries.csv) where compare, the peers and the
# ensemble read them; the peers and the ensemble need no compare run.
$(BD)/compare/bank_queries.csv: $(BD)/index/index.json $(BANK)/queries/queries.csv
	$(MA) benchmark --config $(CFG)/benchmark.yaml $(RUN) --prepare true

$(BD)/compare/comparison.json: $(BD)/compare/bank_queries.csv $(CFG)/compare.yaml
	for d in $(BATCH_DIRS); do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) compare --config $(CFG)/compare.yaml \
			--config $$d/compare_args.yaml $(RUN) --use_wandb false || exit 1; \
	done

# `make benchmark-scores` first runs the peers and the index ensemble (resumable; each skips what is done: about 3 hours
# of one core on a fresh clone for the first batch's 44 queries, most of it the peers; each query of a later batch
# adds 1 to 2 minutes of compare here under load and, by the per-query costs in README "Peers on the benchmark", about 2 minutes of
# the peers, not yet measured on a whole batch); BENCH_WITH= (empty) scores only the tables that exist.
BENCH_WITH ?= peers ensemble
benchmark-scores: venv $(BD)/compare/comparison.json $(BENCH_WITH)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) benchmark --config $(CFG)/benchmark.yaml $(RUN)

# The peers on the bank's queries, batch by batch (configs/demo/peers.yaml): kronfluence's EK-FAC influence, traker's
# TRAK and D-TRAK, EK-FAC-preconditioned unlearning; their tables sit beside compare's, where `make benchmark-scores` reads
# them. They need the prepared batches only, not compare's run: `musicattr benchmark --batches B --methods M
# --export_scores true` then ships the tables of batches that compare has not scored.
peers: venv $(BD)/compare/bank_queries.csv
	for d in $(BATCH_DIRS); do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) peers --config $(CFG)/peers.yaml $(RUN) --compare $$d \
			--work_dir $(BD)/compare/peers $(PEERS_ARGS) || exit 1; \
	done

# The index ensemble (configs/demo/ensemble.yaml): the index averaged over the benchmark model and refits of the bank's
# recipe with training seeds 1 and 2 (each with its Fisher and index; resumable), on the prepared batches as the
# peers; its tables sit beside compare's (method index-ensemble), where `make benchmark-scores` reads them. ENSEMBLE_ARGS
# adds options.
.PHONY: ensemble
ensemble: venv $(BD)/compare/bank_queries.csv
	for d in $(BATCH_DIRS); do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MA) ensemble --config $(CFG)/ensemble.yaml $(RUN) --compare $$d \
			$(ENSEMBLE_ARGS) || exit 1; \
	done

# ---- the paper-scale rehearsal (README "Limits and what runs where") ----
# Every stage that touches the model, as the real CLI with configs/paper, on synthetic latents of the paper's shape
# (64 x 2584) on the CPU: wall time, peak memory, FLOPs per item-timestep, the 8-GPU extrapolation. The default is
# the paper's DiT whole (1.04 B parameters, 24 blocks; fit in bf16-mixed where this CPU runs bf16 at least as fast as
# float32): about an hour on one thread of an AVX-512 BF16 machine, every stage within its 25.3 GB (README). REHEARSE_ARGS
# picks another size, e.g. '--scale 0.0417' for one block (a few minutes); '--stages ...,ekfac,...' adds EK-FAC.
REHEARSE_ARGS ?= --scale 1 --items 2 --checkpointing true
rehearse: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/rehearse.py --out runs/rehearse $(REHEARSE_ARGS)
