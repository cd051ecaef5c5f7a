#!/usr/bin/env bash
# The fast recipe against its variants on a fixed CPU budget (issue #13, step 2).
#
# Every variant starts its adversarial phase from the same reconstruction checkpoint
# (--init) at 128 px and trains until its process has used BUDGET CPU-seconds (user + sys,
# so builds or other load on the machine slow it down without changing its share), with a
# stop and an evaluation after every BUDGET/POINTS of them. Each stop exports the
# generator as a style under RUNS/styles and scores it with `toonbot eval` on the held-out
# photos against the held-out cartoons; the do-nothing baseline and the init itself are
# scored first. Run again, it goes on where it stopped (the CPU-seconds used are kept in
# RUNS/VARIANT.cpu_s, and the points already in the results are skipped). One JSON object per evaluation goes to RUNS/compare.jsonl:
#   {"variant", "cpu_s", "steps" (adversarial), "kid_x100", "kid_std_x100", "identity_cosine", ...}
#
# Usage: tools/compare-fast.sh DATA INIT RUNS [VARIANT ...]
#   DATA  a folder with photos-train, cartoons-train, photos-val, cartoons-val
#   INIT  a fast checkpoint whose reconstruction phase is done
#   RUNS  where the runs, styles and results go (outside the repo)
#   VARIANT: projected (the recipe), p2c-disc (photo2cartoon's global + local
#            discriminators, no backbone), no-luma (content on backbone features only),
#            colour (8x8-block colour instead of luminance), projected-adv0.25 (the
#            projected discriminator's weight 0.25), projected-id10 (face-ID weight 10);
#            default the first three.
# Environment: BIN (default target/release/toonbot), BUDGET (CPU-seconds per variant,
# default 3600), POINTS (evaluations per variant, default 2), STEPS (the runs' adversarial
# step count, which sets their schedule; default 2000).
set -euo pipefail

DATA=$1 INIT=$2 RUNS=$3
shift 3
VARIANTS=("${@:-projected p2c-disc no-luma}")
read -r -a VARIANTS <<< "${VARIANTS[*]}"
BIN=${BIN:-target/release/toonbot}
BUDGET=${BUDGET:-3600} POINTS=${POINTS:-2} STEPS=${STEPS:-2000}
export TOONBOT_STYLES__DIR=$RUNS/styles
mkdir -p "$RUNS"
RESULTS=$RUNS/compare.jsonl

flags() {
  case $1 in
    projected) ;;
    p2c-disc) echo --discriminators photo2cartoon ;;
    no-luma) echo --content-luma 0 ;;
    colour) echo --content-luma 0 --content-colour 10 ;;
    projected-adv0.25) echo --adv-global 0.25 ;;
    projected-id10) echo --face-id 10 ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

# CPU-seconds (user + sys) a live process has used.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) / hz) }' "/proc/$1/stat"
}

# score NAME VARIANT CPU_S STEPS [--baseline]: appends one result line.
score() {
  local name=$1 variant=$2 cpu=$3 steps=$4 report
  if [[ ${5:-} == --baseline ]]; then
    report=$("$BIN" eval --baseline --photos "$DATA/photos-val" --cartoons "$DATA/cartoons-val" --json | tail -1)
  else
    report=$("$BIN" eval --style "$name" --photos "$DATA/photos-val" --cartoons "$DATA/cartoons-val" --json | tail -1)
  fi
  jq -c --arg v "$variant" --argjson cpu "$cpu" --argjson steps "$steps" \
    '{variant: $v, cpu_s: $cpu, steps: $steps} + .' <<< "$report" | tee -a "$RESULTS"
}

if ! grep -qs '"variant":"baseline"' "$RESULTS"; then
  score - baseline 0 0 --baseline
fi
if ! grep -qs '"variant":"init"' "$RESULTS"; then
  "$BIN" train export --checkpoint "$INIT" --name cmp-init --dtype f32
  score cmp-init init 0 0
fi

for variant in "${VARIANTS[@]}"; do
  out=$RUNS/$variant
  # CPU-seconds the variant has used so far, kept across restarts of this script.
  used_file=$RUNS/$variant.cpu_s
  used=$(cat "$used_file" 2> /dev/null || echo 0)
  for point in $(seq 1 "$POINTS"); do
    goal=$((BUDGET * point / POINTS))
    style=cmp-${variant//./}-$point
    if grep -qs "\"style\":\"$style\"" "$RESULTS"; then continue; fi
    if ((used < goal)); then
      if [[ -f $out/checkpoint.safetensors ]]; then start=(--resume); else start=(--init "$INIT"); fi
      # shellcheck disable=SC2046
      nice -n 10 "$BIN" train base --recipe fast \
        --photos "$DATA/photos-train" --cartoons "$DATA/cartoons-train" \
        --val-photos "$DATA/photos-val" --out "$out" --steps "$STEPS" \
        --log-every 10 --sample-every 50 --save-every 100000 \
        "${start[@]}" $(flags "$variant") >> "$RUNS/$variant.log" 2>&1 &
      pid=$! now=0 stopping=0
      while kill -0 "$pid" 2> /dev/null; do
        now=$(cpu_seconds "$pid" 2> /dev/null || echo "$now")
        if ((!stopping && used + now >= goal)); then
          kill -TERM "$pid"
          stopping=1
        fi
        sleep 2
      done
      wait "$pid" || true
      used=$((used + now))
      echo "$used" > "$used_file"
    fi
    "$BIN" train export --checkpoint "$out" --name "$style" --dtype f32
    steps=$(grep -o '[0-9]* adversarial' "$RUNS/styles/$style/style.toml" | cut -d' ' -f1)
    score "$style" "$variant" "$used" "$steps"
  done
done
