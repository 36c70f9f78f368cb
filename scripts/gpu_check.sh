#!/usr/bin/env bash
# The first run on a GPU machine: one command, one GPU, under 10 minutes (estimated: it has never run on a GPU).
#
#   scripts/gpu_check.sh [--dry-run] [--demo DIR] [--out DIR] [--python PY] [--fit-steps N] [--paper-frames N]
#                        [--configs DIR] [--paper-config FILE] [--cpu]
#
# It runs, each timed (wall seconds, start-up included), on GPU 0 (`--trainer.accelerator gpu --trainer.devices 1`):
#   0. the GPU's name (nvidia-smi) and the peak TFLOP/s that MFU is taken against (musicattr.models.throughput:
#      $MUSICATTR_PEAK_BF16_TFLOPS / $MUSICATTR_PEAK_FP32_TFLOPS when set, else a table keyed by that name)
#   1. the demo's inputs, built only when --demo DIR (default runs/demo) lacks them: corpus, encode, fit (configs/demo)
#   2. fit of the demo DiT for --fit-steps steps (default 200) at 32-true and at bf16-mixed (the fit-like timing)
#   3. fisher (configs/demo, vectorize auto) at 32-true and at bf16-mixed: which per-sample path auto took on the
#      GPU, and whether torch's vmap works under CUDA bf16 autocast (it does not on the CPU: pytorch#184890)
#   4. unlearn a training item (index 0) at 32-true and at bf16-mixed (the diagonal Fisher); then the EK-FAC
#      factors (`musicattr ekfac --device cuda`: kronfluence on the GPU) and AbU+'s unlearning step with them
#   5. attribute (configs/demo: Eq. 1 over the whole store, relative score) at 32-true and at bf16-mixed, baseline
#      cache off; the attribute's item-timesteps/s and MFU
#   6. the paper-size DiT (configs/paper/fit.yaml: 1.04 B parameters, 2584 frames): forward and forward + backward
#      at 32-true and bf16-mixed, with MFU (and the demo DiT's, for scale)
#   7. the checks: bf16-mixed attribute scores equal to the 32-true ones (autocast is off for Eq. 1's losses);
#      the bf16-mixed Fisher and unlearning step within bf16's tolerance of the 32-true ones
# Everything goes to --out DIR (default runs/gpu-check): logs/<step>.log, timings.tsv, throughput.json,
# summary.txt. A failed step is reported and the rest still run; the exit status is 1 if any failed.
# Without a CUDA GPU (torch.cuda.is_available() false) it runs nothing, says so, prints what it would have run
# and exits 2. --dry-run prints the commands and exits 0. --configs (default configs/demo) and --paper-config
# (default configs/paper/fit.yaml) swap the configs, and --cpu runs the same plan on the CPU: both for
# tests/test_bf16_path.py, which rehearses the script on the tests' tiny model (its timings mean nothing).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
DEMO=runs/demo
OUT=runs/gpu-check
PY="${PYTHON:-.venv/bin/python}"
FIT_STEPS=200
PAPER_FRAMES=""

CFG=configs/demo
PAPER=configs/paper/fit.yaml
CPU=0

usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --demo) DEMO="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --python) PY="$2"; shift ;;
        --fit-steps) FIT_STEPS="$2"; shift ;;
        --paper-frames) PAPER_FRAMES="$2"; shift ;;
        --configs) CFG="$2"; shift ;;
        --paper-config) PAPER="$2"; shift ;;
        --cpu) CPU=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done

MA="$PY -m musicattr.cli"
TP="$PY -m musicattr.models.throughput"
GPU="--trainer.accelerator gpu --trainer.devices 1"
DEVICE=cuda
GPU_INFO="nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && "
if [ "$CPU" = 1 ]; then
    GPU="--trainer.accelerator cpu --trainer.devices 1"
    DEVICE=cpu
    GPU_INFO=""
fi
STORE="$DEMO/store"
CKPT="$DEMO/fit/last.ckpt"
FISHER="$OUT/fisher-32.safetensors"
T_ATTR=64   # the attribute config's num_draws (read from it below when python can)
if [ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1; then
    T_ATTR="$("$PY" -c "import yaml; print(yaml.safe_load(open('$CFG/attribute.yaml'))['model']['num_draws'])" \
              2>/dev/null || echo 64)"
fi
FRAMES_OPT=""
[ -n "$PAPER_FRAMES" ] && FRAMES_OPT="--frames $PAPER_FRAMES"

# ------------------------------------------------------------------------------------------------ the plan
# one step per line: NAME<TAB>COMMAND (run by bash -c in the repository root)
plan() {
    printf '%s\t%s\n' gpu "$GPU_INFO$TP peak"
    if [ ! -f "$STORE/index.parquet" ]; then
        printf '%s\t%s\n' corpus "$MA corpus --config $CFG/corpus.yaml --run_root $DEMO --workers $(nproc)"
        printf '%s\t%s\n' encode "$MA encode --config $CFG/encode.yaml --run_root $DEMO $GPU"
    fi
    if [ ! -f "$CKPT" ]; then
        printf '%s\t%s\n' fit-demo "$MA fit --config $CFG/fit.yaml --run_root $DEMO $GPU"
    fi
    for p in 32 bf16; do
        prec=$([ $p = 32 ] && echo 32-true || echo bf16-mixed)
        printf '%s\t%s\n' "fit-$p" "$MA fit --config $CFG/fit.yaml --run_root $OUT/fit-$p --data.store $STORE \
--trainer.max_steps $FIT_STEPS --trainer.logger false --trainer.precision $prec $GPU"
    done
    for p in 32 bf16; do
        prec=$([ $p = 32 ] && echo 32-true || echo bf16-mixed)
        printf '%s\t%s\n' "fisher-$p" "$MA fisher --config $CFG/fisher.yaml --run_root $OUT \
--model.checkpoint $CKPT --data.store $STORE --model.out $OUT/fisher-$p.safetensors --model.overwrite true \
--trainer.default_root_dir $OUT/lightning --trainer.precision $prec $GPU"
    done
    for p in 32 bf16; do
        prec=$([ $p = 32 ] && echo 32-true || echo bf16-mixed)
        printf '%s\t%s\n' "unlearn-$p" "$MA unlearn --config $CFG/unlearn.yaml --run_root $OUT \
--checkpoint $CKPT --fisher $FISHER --store $STORE --query null --query_item index:0 \
--out $OUT/unlearned-$p.safetensors --device $DEVICE --precision $prec --ekfac null"
    done
    printf '%s\t%s\n' ekfac "$MA ekfac --config $CFG/ekfac.yaml --run_root $OUT --checkpoint $CKPT --store $STORE \
--out $OUT/ekfac --device $DEVICE"
    printf '%s\t%s\n' unlearn-abu "$MA unlearn --config $CFG/unlearn.yaml --run_root $OUT \
--checkpoint $CKPT --fisher $FISHER --store $STORE --query null --query_item index:0 \
--out $OUT/unlearned-abu.safetensors --device $DEVICE --precision 32-true --ekfac $OUT/ekfac"
    for p in 32 bf16; do
        prec=$([ $p = 32 ] && echo 32-true || echo bf16-mixed)
        printf '%s\t%s\n' "attribute-$p" "$MA attribute --config $CFG/attribute.yaml --run_root $OUT \
--model.checkpoint $CKPT --data.store $STORE --model.unlearned $OUT/unlearned-32.safetensors \
--model.out_dir $OUT/attribute-$p --model.use_baseline_cache false --model.overwrite true \
--trainer.default_root_dir $OUT/lightning --trainer.precision $prec $GPU"
    done
    printf '%s\t%s\n' bench-paper "$TP bench --config $PAPER --device $DEVICE \
--precisions 32-true,bf16-mixed --repeats 3${FRAMES_OPT:+ $FRAMES_OPT} --json $OUT/throughput.json"
    printf '%s\t%s\n' bench-demo "$TP bench --config $CFG/fit.yaml --device $DEVICE \
--precisions 32-true,bf16-mixed --repeats 5 --json $OUT/throughput.json"
}

print_plan() {
    plan | while IFS=$'\t' read -r name cmd; do
        printf '[%s]\n  %s\n' "$name" "$cmd"
    done
    printf '[mfu]\n  %s\n' "$TP stage --config $CFG/fit.yaml --name attribute --store $STORE --draws $T_ATTR \
--passes 2f+1fb --seconds <attribute-32's wall seconds> --precision 32-true --json $OUT/throughput.json"
    printf '[checks]\n  %s\n' "$PY (inline): attribute-bf16 scores == attribute-32 scores \
(within 2e-6 x the largest loss); \
fisher-bf16 vs fisher-32 (< 0.1 per tensor) and unlearned-bf16 vs unlearned-32 relative differences; the \
Fishers' vectorize choices"
}

if [ "$DRY" = 1 ]; then
    echo "gpu_check --dry-run: the commands it runs on a machine with one GPU (in $ROOT):"
    print_plan
    exit 0
fi

if [ "$CPU" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU: torch.cuda.is_available() is False in $PY (or $PY cannot import torch)," >&2
    echo "so nothing was run. fix: run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    echo "(make venv there). On such a machine it would have run:" >&2
    print_plan >&2
    exit 2
fi

# ------------------------------------------------------------------------------------------------ the run
mkdir -p "$OUT/logs"
: > "$OUT/timings.tsv"
rm -f "$OUT/throughput.json"
export WANDB_MODE=offline PYTHONWARNINGS="ignore:pkg_resources is deprecated"
FAILED=()
START=$(date +%s.%N)
while IFS=$'\t' read -r name cmd; do
    echo "== $name: $cmd"
    t0=$(date +%s.%N)
    bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1 < /dev/null
    rc=$?
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\n' "$name" "$secs" "$rc" >> "$OUT/timings.tsv"
    tail -n 12 "$OUT/logs/$name.log" | sed 's/^/   | /'
    if [ "$rc" -ne 0 ]; then
        echo "   FAILED ($rc) after $secs s: see $OUT/logs/$name.log"
        FAILED+=("$name")
    else
        echo "   $secs s"
    fi
done < <(plan)

ATTR_S=$(awk -F'\t' '$1 == "attribute-32" && $3 == 0 { print $2 }' "$OUT/timings.tsv")
if [ -n "$ATTR_S" ]; then
    $TP stage --config "$CFG/fit.yaml" --name attribute --store "$STORE" --draws "$T_ATTR" --passes 2f+1fb \
        --seconds "$ATTR_S" --precision 32-true --json "$OUT/throughput.json" 2>&1 | tail -n 1 | tee "$OUT/logs/mfu.log"
fi

echo "== checks"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/logs/checks.log"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
ok = True
try:
    import numpy as np
    import pandas as pd
    a = pd.read_parquet(out / "attribute-32/scores.parquet").sort_values("index")
    b = pd.read_parquet(out / "attribute-bf16/scores.parquet").sort_values("index")
    same = np.allclose(a["score"], b["score"], rtol=0, atol=2e-6 * float(a["baseline_loss"].abs().max()))
    print(f"attribute: bf16-mixed scores {'equal' if same else 'DIFFER FROM'} the 32-true ones (float32 losses "
          f"under autocast-off; max |diff| {float((a['score'] - b['score']).abs().max()):.2e}); "
          f"top-10 overlap {len(set(a.nsmallest(10, 'rank')['index']) & set(b.nsmallest(10, 'rank')['index']))}/10")
    ok &= bool(same)
except Exception as e:  # noqa: BLE001
    print(f"attribute check not made: {e}")
    ok = False
try:
    from safetensors import safe_open
    from safetensors.torch import load_file
    f32, f16 = load_file(str(out / "fisher-32.safetensors")), load_file(str(out / "fisher-bf16.safetensors"))
    rel = max(float((f32[k] - f16[k]).norm() / f32[k].norm()) for k in f32)
    print(f"fisher: bf16-mixed vs 32-true, largest per-tensor relative difference {rel:.2e} (tests allow 0.1)")
    for p in ("32", "bf16"):
        with safe_open(str(out / f"fisher-{p}.safetensors"), "pt") as f:
            print(f"fisher-{p}: vectorize {f.metadata().get('vectorize')}")
    ok &= rel < 0.1
    u32, u16 = load_file(str(out / "unlearned-32.safetensors")), load_file(str(out / "unlearned-bf16.safetensors"))
    import torch
    from musicattr.models.diffusion_module import load_diffusion_module
    with safe_open(str(out / "unlearned-32.safetensors"), "pt") as f:
        ckpt = json.loads(f.metadata()["checkpoint"])
    theta = dict(load_diffusion_module(ckpt).net.named_parameters())
    d32 = torch.cat([(u32[k] - theta[k].detach()).flatten().double() for k in u32])
    d16 = torch.cat([(u16[k] - theta[k].detach()).flatten().double() for k in u32])
    print(f"unlearn: bf16-mixed step vs 32-true, relative difference {float((d32 - d16).norm() / d32.norm()):.2e}")
except Exception as e:  # noqa: BLE001
    print(f"fisher / unlearn check not made: {e}")
    ok = False
sys.exit(0 if ok else 1)
EOF
[ "${PIPESTATUS[0]}" -ne 0 ] && FAILED+=("checks")

END=$(date +%s.%N)
{
    echo "gpu_check: $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.0f", b - a }') s in all"
    echo "step	seconds	exit"
    cat "$OUT/timings.tsv"
    cat "$OUT/logs/mfu.log" 2>/dev/null
    grep -h "TFLOP\|parameters" "$OUT/logs/bench-paper.log" "$OUT/logs/bench-demo.log" 2>/dev/null
    cat "$OUT/logs/checks.log" 2>/dev/null
} | tee "$OUT/summary.txt"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]} (logs in $OUT/logs/)"
    exit 1
fi
echo "gpu_check: every step ran; figures in $OUT/summary.txt and $OUT/throughput.json"
