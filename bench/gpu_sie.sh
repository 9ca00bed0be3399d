#!/bin/bash
# sie at the group's GPU setting (256 px, 10,000 / 1,000 / 4,000 images: bench/cosmosim_problems.py's GPU command),
# sized to a time budget, for a GPU lent for minutes: one calibration epoch (simulation, conversion and compile
# included; a 64-image smoke run of train.py beside it fails fast), then as many epochs as fit before the budget,
# less 180 s for the run's start and the four evaluations.
#
#   bash bench/gpu_sie.sh BUDGET_SECONDS [MAX_EPOCHS]     # results and logs in $OUT (default /tmp/out)
#
# On a machine whose Python has jax (CUDA), flax, optax, orbax-checkpoint, pandas, sympy and OpenCV but not the
# rest, put these wheels (cp312, manylinux) on PYTHONPATH first (pip install --no-deps --target DIR):
# tensorflow-datasets 4.9.10, tensorflow-metadata 1.21.0, googleapis-common-protos, grain 0.2.18, array_record
# 0.8.6, dm-tree 0.1.10, promise 2.3, simple-parsing 0.1.9, docstring_parser, immutabledict, termcolor, toml,
# portpicker, more-itertools, importlib_resources, cascadict 0.8.5, cosmosim 3.3.0 (18 MB in all).
set -u -o pipefail
T0=$(date +%s)
BUDGET=$1
MAX_EPOCHS=${2:-40}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=/tmp/jaxnets_data
NUM="--num-train ${NUM_TRAIN:-10000} --num-validation ${NUM_VALIDATION:-1000} --num-test ${NUM_TEST:-4000}"
SIZE=${SIZE:-256}
elapsed() { echo $(( $(date +%s) - T0 )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; lscpu | grep 'Model name'; } \
    | tee "$OUT/machine.txt"
$PY - <<'EOF' | tee -a "$OUT/machine.txt" || exit 3
import jax, flax, optax, orbax.checkpoint, tensorflow_datasets, grain, CosmoSim, importlib.metadata as m
print({p: m.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
                                 "grain", "cosmosim", "numpy")}, jax.devices())
EOF

# Smoke test beside the simulation: the whole train.py path on the built-in lens data (fails fast).
XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 $PY train.py --num-train 64 --num-validation 32 --num-test 32 --batch-size 32 \
    --epochs 1 --workdir /tmp/smoke --data-dir /tmp/smoke_data --compilation-cache '' > "$OUT/smoke.log" 2>&1 &
SMOKE=$!

TRAIN="--simulate bench/problems/sie.toml --targets sigma,sigma2,theta,xiX,xiY,alpha[*][*],beta[*][*],einsteinradius,ellipseratio,orientation,R,phi --image-size $SIZE $NUM --data-dir $DATA --target-weights sigma:2 --augment"
$PY train.py $TRAIN --epochs 1 --workdir /tmp/calibrate > "$OUT/calibrate.log" 2>&1 &
CAL=$!
wait $SMOKE; SMOKE_RC=$?
echo "smoke rc $SMOKE_RC at $(elapsed) s"; tail -n 5 "$OUT/smoke.log"
if [ $SMOKE_RC -ne 0 ]; then kill $CAL; tail -n 40 "$OUT/smoke.log"; exit 4; fi
wait $CAL; CAL_RC=$?
echo "calibration rc $CAL_RC at $(elapsed) s"; grep -E "Epoch|imulat|onvert" "$OUT/calibrate.log" | tail -n 8
if [ $CAL_RC -ne 0 ]; then tail -n 40 "$OUT/calibrate.log"; exit 5; fi

EPOCH_S=$(grep -oE 'time = [0-9.]+ s' "$OUT/calibrate.log" | tail -n 1 | grep -oE '[0-9.]+')
LEFT=$(( BUDGET - $(elapsed) ))
# Reserved: the run's start and compile from the cache (~30 s) and the four evaluations (~30 s each).
EPOCHS=$($PY -c "print(max(1, min($MAX_EPOCHS, int(($LEFT - 180) / $EPOCH_S))))")
echo "epoch ${EPOCH_S} s, ${LEFT} s left: ${EPOCHS} epochs"
$PY bench/cosmosim_problems.py --problems sie --image-size $SIZE $NUM --epochs $EPOCHS --data-dir $DATA \
    --runs /tmp/runs --out "$OUT/sie256.json" > "$OUT/bench.log" 2>&1
RC=$?
grep -E "^Epoch|^\|" "$OUT/bench.log" | tail -n 80
echo "bench rc $RC at $(elapsed) s"
cp /tmp/runs/sie/metrics*.json* /tmp/runs/sie/loss_curve.png "$OUT/" 2>/dev/null
exit $RC
