#!/usr/bin/env bash
# The prepared script of a GPU session (DESIGN §8): runs on the device machine, in the
# repository root, with no cargo and no network. It needs, carried in CARRY (default
# .gpu-carry, see tools/gpu/pack_data.sh):
#   toonbot                 a CUDA build (tools/build-cuda.sh), copied here
#   data.tar                photos/ and cartoons/ as 256-px JPEGs (tools/gpu/pack_data.sh)
#   compact.safetensors     optional: the base run's generators-only compact checkpoint
#                           (models/training/p2c-base.safetensors, 15 MB) to resume from
# and writes under $OUT, as it goes (so a killed run still leaves them):
#   session.log             everything printed, nvidia-smi, timings
#   bench_candle_cuda.jsonl `toonbot bench --train` on CUDA at 256, batch 1 and 8 (a line
#                           each): ms/step, images/s, max |CUDA - CPU| of the generator
#   bench_torch_cuda.jsonl  the PyTorch reference step (tools/reference/p2c_train_step.py),
#                           when torch is importable
#   gpu.csv                 GPU memory and utilisation every 10 s
#   train.jsonl             the training log (losses, images/s)
#   samples.png             the latest sample grid (photo | cartoon | cycle)
#   p2c-base.safetensors    the generators-only compact checkpoint (f16, 15 MB), copied after
#                           every save: commit it as models/training/p2c-base.safetensors to
#                           continue next time, and install the style from it with
#                           `toonbot train export --checkpoint p2c-base.safetensors --name p2c`
# (8 files at most come back from the device.)
# The full checkpoint (432 MB) stays on the device: files over 16 MiB do not come back, so a
# later session resumes the generators and starts the discriminators and Adam afresh.
#
# Env: TRAIN_SECONDS (training time, default 400, cut so that the whole script ends within
# DEADLINE seconds, default 560), BATCH (default 1), SIZE (256).
# Run:  bash tools/gpu/train_base.sh    (device tool: carry [".gpu-carry"], timeout_s 590)
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?run this on the device machine, where OUT is set}"
carry=${CARRY:-.gpu-carry}
train_seconds=${TRAIN_SECONDS:-400}
deadline=${DEADLINE:-560}
batch=${BATCH:-1}
size=${SIZE:-256}
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
stamp "data: $(ls "$data/photos" | wc -l) photos, $(ls "$data/cartoons" | wc -l) cartoons"

# One process per batch size: batch 8 may not fit in GPU memory (candle keeps every
# intermediate of the six generator passes for the backward pass), and must not take the
# batch-1 numbers down with it.
for b in 1 8; do
    stamp "candle-CUDA training step, batch $b (and CUDA vs CPU generator output)"
    timeout 150 "$bin" --device cuda bench --train --size "$size" --batch "$b" --runs 3 \
        --json >>"$OUT/bench_candle_cuda.jsonl" || stamp "candle bench at batch $b failed"
done
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    for b in 1 8; do
        stamp "PyTorch reference training step, batch $b"
        timeout 90 python3 tools/reference/p2c_train_step.py --device cuda --size "$size" \
            --batch "$b" --steps 3 >>"$OUT/bench_torch_cuda.jsonl" || stamp "torch bench failed"
    done
fi
cat "$OUT"/bench_*.jsonl

resume=()
if [ -f "$carry/compact.safetensors" ]; then
    cp "$carry/compact.safetensors" "$run/compact.safetensors"
    resume=(--resume)
    stamp "resuming the generators from the carried compact checkpoint (discriminators and Adam restart)"
fi

# Copies the log, the latest grid and the compact checkpoint to $OUT as they change.
(
    while sleep 20; do
        [ -f "$run/train.jsonl" ] && cp "$run/train.jsonl" "$OUT/train.jsonl"
        latest=$(ls "$run/samples" 2>/dev/null | tail -n 1)
        [ -n "$latest" ] && cp "$run/samples/$latest" "$OUT/samples.png"
        [ -f "$run/compact.safetensors" ] && cp "$run/compact.safetensors" "$OUT/p2c-base.safetensors"
    done
) &
watcher=$!

# Fit the device command's limit: leave 45 s for the last copies.
left=$((deadline - ($(date +%s) - started) - 45))
[ "$left" -lt "$train_seconds" ] && train_seconds=$left
stamp "training base for ${train_seconds}s at batch $batch"
timeout -s INT -k 60 $((train_seconds + 120)) "$bin" --device cuda train base \
    --photos "$data/photos" --cartoons "$data/cartoons" --out "$run" --size "$size" \
    --batch "$batch" --save-every 250 --sample-every 250 --log-every 10 \
    --time-limit "$train_seconds" --compact "$run/compact.safetensors" --compact-generators \
    "${resume[@]}"
stamp "training returned $?"
kill $watcher 2>/dev/null
cp "$run/train.jsonl" "$OUT/train.jsonl"
latest=$(ls "$run/samples" 2>/dev/null | tail -n 1)
[ -n "$latest" ] && cp "$run/samples/$latest" "$OUT/samples.png"
cp "$run/compact.safetensors" "$OUT/p2c-base.safetensors"
ls -la "$run" "$OUT"
stamp "done"
