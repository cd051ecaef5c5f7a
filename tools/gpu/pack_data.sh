#!/usr/bin/env bash
# Prepares the base model's training data for a GPU session (DESIGN §8: the device has no
# network, and everything it gets travels with the working tree, 64 MiB in all).
#
#   tools/gpu/pack_data.sh [CARRY_DIR]        (default .gpu-carry, ignored by git)
#
# 1. `toonbot prepare` (largest face, aligned, whitened, 256x256) on
#    ../shared/data/photos/{p2c-women,celeba,selfies,p2c-aligned/train} into
#    STAGING/photos/<source>/ (default CARRY_DIR.staging, outside what is carried; kept
#    between runs: prepare is slow on a CPU, a few hundred ms a photo; already prepared
#    folders are skipped).
# 2. Packs CARRY_DIR/data.tar: photos/ and cartoons/ (cartoons/p2c/train, 512 -> 256) as
#    JPEG quality 90, photos taken round-robin over the sources until MAX_MIB (default 22;
#    the binary and the repository need the rest of the 64 MiB) is reached.
#
# 3. Copies models/training/p2c-base.safetensors (the base run's generators-only compact
#    checkpoint, once a GPU session has brought one back) to CARRY_DIR/compact.safetensors,
#    so that tools/gpu/train_base.sh resumes it.
#
# Env: TOONBOT (default target/release/toonbot, else target/debug/toonbot; a CPU build is
# fine), PYTHON with Pillow (default /work/venv/bin/python, else python3), MAX_MIB, LIMIT
# (photos per source, for a quick try).
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=${1:-.gpu-carry}
data=${DATA:-../shared/data}
toonbot=${TOONBOT:-}
if [ -z "$toonbot" ]; then
    for t in target/release/toonbot target/debug/toonbot; do
        [ -x "$t" ] && toonbot=$t && break
    done
fi
[ -n "$toonbot" ] || { echo "build toonbot first (cargo build --release)" >&2; exit 1; }
python=${PYTHON:-/work/venv/bin/python}
[ -x "$python" ] || python=python3
max_mib=${MAX_MIB:-22}
limit=${LIMIT:-0}

staging=${STAGING:-$carry.staging}
mkdir -p "$carry"
for source in p2c-women celeba selfies p2c-aligned/train; do
    name=${source%%/*}
    out="$staging/photos/$name"
    if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
        echo "already prepared: $out ($(ls "$out" | wc -l) faces)"
        continue
    fi
    src="$data/photos/$source"
    if [ "$limit" -gt 0 ]; then
        subset="$staging/subset/$name"
        mkdir -p "$subset"
        mapfile -t files < <(find "$src" -maxdepth 1 -type f | sort)
        cp "${files[@]:0:$limit}" "$subset/"
        src=$subset
    fi
    "$toonbot" prepare --photos "$src" --out "$out"
done

"$python" - "$carry" "$data/cartoons/p2c/train" "$max_mib" "$staging/photos" <<'PY'
import io, os, sys, tarfile
from PIL import Image

carry, cartoons, max_mib, staging = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
budget = int(max_mib * 1024 * 1024)

def jpeg(path):
    img = Image.open(path).convert("RGB")
    if img.size != (256, 256):
        img = img.resize((256, 256), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()

def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return len(data) + 1024

path = os.path.join(carry, "data.tar")
used, counts = 0, {}
with tarfile.open(path + ".tmp", "w") as tar:
    for f in sorted(os.listdir(cartoons)):
        used += add(tar, f"cartoons/{os.path.splitext(f)[0]}.jpg", jpeg(os.path.join(cartoons, f)))
    sources = {s: sorted(os.listdir(os.path.join(staging, s))) for s in sorted(os.listdir(staging))}
    for i in range(max(map(len, sources.values()), default=0)):
        for s, files in sources.items():
            if i >= len(files):
                continue
            data = jpeg(os.path.join(staging, s, files[i]))
            if used + len(data) + 1024 > budget:
                break
            used += add(tar, f"photos/{s}-{os.path.splitext(files[i])[0]}.jpg", data)
            counts[s] = counts.get(s, 0) + 1
        else:
            continue
        break
os.replace(path + ".tmp", path)
print(f"{path}: {used / 2**20:.1f} MiB, cartoons {len(os.listdir(cartoons))}, photos {counts}")
PY

checkpoint=models/training/p2c-base.safetensors
if [ -f "$checkpoint" ]; then
    cp "$checkpoint" "$carry/compact.safetensors"
    echo "resuming next time from $checkpoint"
fi
