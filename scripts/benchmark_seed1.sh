#!/bin/bash
# The seed-1 tables of every benchmark method for the queries of scripts/benchmark_seed_overlap.py (issue 19, part 4;
# docs/evidence/benchmark_seed_overlap.md): each method rerun with draw seed 1 and otherwise the settings of its
# seed-0 tables in runs/demo/benchmark/compare, written under runs/demo/benchmark-seed1 (nothing else is written).
# One process at a time, one torch thread; every command's wall-clock seconds go to logs/times.tsv. Then:
#   .venv/bin/python scripts/benchmark_seed_overlap.py --times runs/demo/benchmark-seed1/logs/times.tsv
# Resumes nothing: rerun from scratch with the folder removed (the peers skip tables made with the same settings).
set -u
cd "$(dirname "$0")/.."
B=${B:-runs/demo/benchmark-seed1}
CK=assets/bank/demo/model.ckpt
FI=runs/demo/benchmark/fisher.safetensors
CMP=runs/demo/benchmark/compare
QS=${QS:-"q000 q001 q002 q004 q006 q008 q009 q013"}   # the rule of benchmark_seed_overlap.py (first 8 generated, report)
MA=".venv/bin/musicattr"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$B/logs"
timed() {  # timed NAME cmd...: run at nice 5, log to logs/NAME.log, append NAME, seconds, exit status, time
  local name=$1; shift
  local s; s=$(date +%s%N)
  nice -n 5 "$@" > "$B/logs/$name.log" 2>&1
  local rc=$?
  local e; e=$(date +%s%N)
  printf '%s\t%d.%03d\t%d\t%s\n' "$name" $(( (e-s)/1000000000 )) $(( (e-s)/1000000 % 1000 )) $rc "$(date -Is)" \
    >> "$B/logs/times.tsv"
  return $rc
}

# A view of the store (same files, same fingerprint) whose baseline and s_i caches at seed 1 stay under $B.
mkdir -p "$B/store/baselines" "$B/store/sensitivity"
for f in manifest.json index.parquet shards skipped.json; do ln -sfn "$(realpath runs/demo/store/$f)" "$B/store/$f"; done

# Eq. 1: the query's Eq. 2 draws (K = 128) and the scoring draws (T = 32) at seed 1 (compare.yaml's other settings)
for q in $QS; do
  timed "unlearn-$q" $MA unlearn --checkpoint $CK --fisher $FI --query $CMP/generated/$q.query.safetensors \
    --out "$B/queries/$q/unlearned.safetensors" --lr 1e-6 --steps 1 --num_draws 128 --target all --strategy mixed \
    --damping 0.001 --seed 1 || exit 1
  timed "attribute-$q" $MA attribute --model.checkpoint $CK --model.unlearned "$B/queries/$q/unlearned.safetensors" \
    --model.out_dir "$B/queries/$q/unlearning" --model.num_draws 32 --model.seed 1 --model.relative true \
    --model.top_k 10 --data.store "$B/store" --data.batch_size 16 --trainer.accelerator cpu --trainer.devices 1 \
    --trainer.default_root_dir "$B/logs" || exit 1
done
# Eq. 1, the scoring draws only: the compare run's seed-0 unlearned file, scoring seed 1
for q in $QS; do
  timed "attribute-scoring-only-$q" $MA attribute --model.checkpoint $CK \
    --model.unlearned $CMP/queries/$q/unlearned.safetensors --model.out_dir "$B/queries/$q/unlearning-scoring-seed1" \
    --model.num_draws 32 --model.seed 1 --model.relative true --model.top_k 10 --data.store "$B/store" \
    --data.batch_size 16 --trainer.accelerator cpu --trainer.devices 1 --trainer.default_root_dir "$B/logs" || exit 1
done

# The index: a second build with scoring seed 1 (the store's caches not written), then the queries against it with
# psi from the seed-1 unlearned files, and (build draws only) from the seed-0 ones; a check that the query path
# reproduces compare's seed-0 index tables from the seed-0 index.
U1=$(for q in $QS; do printf '%s/queries/%s/unlearned.safetensors, ' "$B" $q; done)
U0=$(for q in $QS; do printf '%s/queries/%s/unlearned.safetensors, ' $CMP $q; done)
timed index-build $MA index --config configs/demo/index.yaml --run_root runs/demo --model.checkpoint $CK \
  --model.fisher $FI --model.seed 1 --model.out "$B/index" --model.write_caches false \
  --trainer.default_root_dir "$B/index" || exit 1
timed index-query $MA query --index "$B/index" --checkpoint $CK --fisher $FI --store runs/demo/store \
  --out_dir "$B/index_queries" --unlearned "[${U1%, }]" --relative true
timed index-query-build-only $MA query --index "$B/index" --checkpoint $CK --fisher $FI --store runs/demo/store \
  --out_dir "$B/index_queries_build_only" --unlearned "[${U0%, }]" --relative true
timed check-index-query-seed0 $MA query --index runs/demo/benchmark/index --checkpoint $CK --fisher $FI \
  --store runs/demo/store --out_dir "$B/check/index_queries_seed0" --unlearned "[${U0%, }]" --relative true

# The peers at draw seed 1 with the seed-0 runs' settings (docs/evidence/peers_benchmark.md). The EK-FAC factors are
# fitted once per model: a copy of the seed-0 ones, reused through --fit_seed 0 (fit_seed null would mean seed 1 and
# refit them). TRAK / D-TRAK keep proj_seed 0.
mkdir -p "$B/peers/kronfluence/ekfac"
cp -an $CMP/peers/kronfluence/ekfac/factors_f83f18db7491c "$B/peers/kronfluence/ekfac/"
QL="[$(echo $QS | sed 's/ /, /g')]"
P=($MA peers --config configs/demo/peers.yaml --run_root runs/demo --seed 1 --fit_seed 0 --queries "$QL"
   --out_dir "$B" --work_dir "$B/peers")
timed peers-ekfac "${P[@]}" --peers '[ekfac]' --query_draws 32
timed peers-dtrak "${P[@]}" --peers '[dtrak]' --proj_dim 512 --query_draws 32 --batch_size 8 --query_batch_size 2
timed peers-unlearning-ekfac "${P[@]}" --peers '[unlearning-ekfac]'
timed peers-trak "${P[@]}" --peers '[trak]' --proj_dim 512 --query_draws 32 --batch_size 8 --query_batch_size 2

# Check: the peers rerun at draw seed 0 reproduce the seed-0 tables (so what moves at seed 1 is the draws)
mkdir -p "$B/check/peers/kronfluence/ekfac"
cp -an $CMP/peers/kronfluence/ekfac/factors_f83f18db7491c "$B/check/peers/kronfluence/ekfac/"
C=($MA peers --config configs/demo/peers.yaml --run_root runs/demo --seed 0 --fit_seed 0 --queries "$QL"
   --out_dir "$B/check" --work_dir "$B/check/peers")
timed check-peers-dtrak-seed0 "${C[@]}" --peers '[dtrak]' --proj_dim 512 --query_draws 32 --batch_size 8 \
  --query_batch_size 2
timed check-peers-ekfac-seed0 "${C[@]}" --peers '[ekfac]' --query_draws 32

# The index ensemble at draw seed 1: each refit member's index rebuilt with scoring seed 1 (the benchmark model's is
# $B/index above), then `musicattr ensemble` with seed 1 (the query's Eq. 2 draws on every member); members as the
# seed-0 ensemble's (runs/demo/benchmark/ensemble, `make ensemble`). The seconds of the whole step: ensemble-seed1.
E=runs/demo/benchmark/ensemble
cat > "$B/ensemble-seed1.yaml" <<YAML
compare: $CMP
store: runs/demo/store
bank_dir: assets/bank/demo
work_dir: $B/ensemble
out_dir: $B
members:
  - {seed: 0, checkpoint: $CK, fisher: $FI, index: $B/index}
  - {seed: 1, checkpoint: $E/member-1/model.ckpt, fisher: $E/member-1/fisher.safetensors, index: $B/ensemble-index-1}
  - {seed: 2, checkpoint: $E/member-2/model.ckpt, fisher: $E/member-2/fisher.safetensors, index: $B/ensemble-index-2}
fisher_config: configs/demo/fisher.yaml
index_config: configs/demo/index.yaml
queries: $QL
unlearning: {lr: 1.0e-6, steps: 1, num_draws: 128, target: all, strategy: mixed, damping: 0.001}
seed: 1
draws_per_forward: 16
method: index-ensemble
threads: 1
YAML
timed ensemble-seed1 bash -c "
  for m in 1 2; do
    [ -f $B/ensemble-index-\$m/index.json ] || $MA index --config configs/demo/index.yaml --run_root runs/demo \\
      --model.checkpoint $E/member-\$m/model.ckpt --model.fisher $E/member-\$m/fisher.safetensors --model.seed 1 \\
      --model.out $B/ensemble-index-\$m --model.write_caches false --trainer.default_root_dir $B/ensemble-index-\$m \\
      || exit 1
  done
  $MA ensemble --config $B/ensemble-seed1.yaml"
