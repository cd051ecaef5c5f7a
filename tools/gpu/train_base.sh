#!/usr/bin/env bash
# The prepared script of a GPU session (DESIGN §8): runs on the device machine, in the
# repository root, with no cargo, no network and no ../shared. It needs, carried in CARRY
# (default .gpu-carry, made by tools/gpu/pack_data.sh):
#   toonbot             a CUDA build (tools/build-cuda.sh), copied here
#   data.tar            photos-train/, photos-val/, cartoons-train/ as 256-px JPEGs
#   group.jpg           the photo the pipeline bench runs on
# and the base run's compact checkpoint, models/training/base-fast.safetensors (tracked).
# It runs, each step bounded in time, writing under $OUT as it goes (so a killed run still
# leaves them):
#   1. the CUDA check: bench_cuda.jsonl, `toonbot bench` on the GPU: every pipeline stage, and
#      the generator's ms per face at batch 1, 4, 16 and 64 (faces/s = 1000 / ms);
#      bench_train_cuda.jsonl, `bench --train --recipe fast` at SIZE and batch 8 and 16:
#      s/step, images/s, peak memory and max |CUDA - CPU| of the generator's output;
#   2. the fast recipe (with TRAIN_FLAGS, the base run's variant flags) at SIZE and BATCH,
#      its generator started from that checkpoint (`--init`; discriminators and Adam
#      restart), for what is left of DEADLINE: train.jsonl, samples.png (the latest grid)
#      and base-fast-gpu.safetensors (the compact checkpoint, 14 MB, copied after every
#      save). Export it with `toonbot train export --checkpoint base-fast-gpu.safetensors
#      --name NAME`, and continue it on the CPU with `train base --init` (its spec, batch
#      and paths differ from the CPU run's, so it is a new run, not a --resume).
#   session.log (everything printed, timings) and gpu.csv (memory and utilisation every
#   10 s). 8 files at most come back, each under 16 MiB.
#
# Env: INIT (the checkpoint to start from), SIZE (256), BATCH (16), STEPS (the schedule's
# adversarial steps, 2000), TRAIN_FLAGS, DEADLINE (seconds the whole script may take, 560),
# BENCH (0 skips step 1, for a second call in the same session), DEVICE (cuda; cpu for a
# dry run here).
# Run:  bash tools/gpu/train_base.sh    (device tool: carry [".gpu-carry"], timeout_s 590)
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?run this on the device machine, where OUT is set}"
carry=${CARRY:-.gpu-carry}
deadline=${DEADLINE:-560}
batch=${BATCH:-16}
size=${SIZE:-256}
steps=${STEPS:-2000}
device=${DEVICE:-cuda}
read -r -a train_flags <<<"${TRAIN_FLAGS:-}"
bin=$carry/toonbot
run=/tmp/toonbot-run
data=/tmp/toonbot-data
exec > >(tee -a "$OUT/session.log") 2>&1
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started)) s] $*"; }

# CUDA libraries (cuBLAS, cuRAND, ...) from PyTorch's wheels; the driver's libcuda is on the
# system path already.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for pattern in ("nvidia/*/lib", "nvidia/cu*/lib", "torch/lib"):
        dirs.update(d for d in glob.glob(os.path.join(sp, pattern)) if os.path.isdir(d))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
stamp "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi || true
nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv -l 10 \
    >"$OUT/gpu.csv" 2>/dev/null &
smi=$!
trap 'kill $smi $watcher 2>/dev/null' EXIT
chmod +x "$bin"
"$bin" --version || { stamp "the carried binary does not run"; exit 1; }

mkdir -p "$data" "$run"
tar -xf "$carry/data.tar" -C "$data"
stamp "data: $(ls "$data/photos-train" | wc -l) photos, $(ls "$data/cartoons-train" | wc -l) cartoons, $(ls "$data/photos-val" | wc -l) held-out photos"

if [ "${BENCH:-1}" = 1 ]; then
    stamp "CUDA check: pipeline stages and the generator at batch 1-64"
    timeout 90 "$bin" --device "$device" bench --photo "$carry/group.jpg" --batch 1 4 16 64 --runs 3 \
        --json >>"$OUT/bench_cuda.jsonl" || stamp "the pipeline bench failed"
    # One process per batch size, so that one that runs out of memory keeps the other's numbers.
    for b in 8 16; do
        stamp "fast training step at $size px, batch $b (and CUDA vs CPU generator output)"
        timeout 90 "$bin" --device "$device" bench --train --recipe fast --size "$size" --batch "$b" \
            --runs 3 --json >>"$OUT/bench_train_cuda.jsonl" || stamp "the training bench at batch $b failed"
    done
    cat "$OUT"/bench_*.jsonl
fi

# Copies the log, the latest grid and the compact checkpoint to $OUT as they change.
(
    while sleep 20; do
        [ -f "$run/train.jsonl" ] && cp "$run/train.jsonl" "$OUT/train.jsonl"
        latest=$(ls "$run/samples" 2>/dev/null | tail -n 1)
        [ -n "$latest" ] && cp "$run/samples/$latest" "$OUT/samples.png"
        [ -f "$run/compact.safetensors" ] && cp "$run/compact.safetensors" "$OUT/base-fast-gpu.safetensors"
    done
) &
watcher=$!

# Fit the device command's limit: leave 45 s for the last save and copies.
train_seconds=$((deadline - ($(date +%s) - started) - 45))
[ "$train_seconds" -ge 30 ] || { stamp "no time left to train (DEADLINE=$deadline)"; exit 1; }
stamp "training the fast recipe for ${train_seconds}s at $size px, batch $batch ${train_flags[*]}"
timeout -s INT -k 60 $((train_seconds + 60)) "$bin" --device "$device" train base --recipe fast \
    --photos "$data/photos-train" --cartoons "$data/cartoons-train" \
    --val-photos "$data/photos-val" --out "$run" --init "${INIT:-models/training/base-fast.safetensors}" \
    --size "$size" --high-size "$size" --batch "$batch" --steps "$steps" \
    --save-every 100 --sample-every 100 --log-every 10 --time-limit "$train_seconds" \
    --compact "$run/compact.safetensors" "${train_flags[@]}"
stamp "training returned $?"
kill $watcher 2>/dev/null
cp "$run/train.jsonl" "$OUT/train.jsonl"
latest=$(ls "$run/samples" 2>/dev/null | tail -n 1)
[ -n "$latest" ] && cp "$run/samples/$latest" "$OUT/samples.png"
cp "$run/compact.safetensors" "$OUT/base-fast-gpu.safetensors"
ls -la "$run" "$OUT"
stamp "done"
