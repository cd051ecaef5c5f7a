#!/usr/bin/env bash
# Prepares what a GPU session carries (DESIGN §8: the device has no network and no
# ../shared, and everything it gets travels with the working tree, 64 MiB in all):
#
#   tools/gpu/pack_data.sh [CARRY_DIR]        (default .gpu-carry, ignored by git)
#
# First build the CUDA binary (tools/build-cuda.sh) and copy it to CARRY_DIR/toonbot.
# 1. CARRY_DIR/group.jpg: the group photo `toonbot bench` times the pipeline on.
# 2. CARRY_DIR/data.tar: photos-train/, photos-val/ and cartoons-train/ from DATA (default
#    ~/toonbot-runs/data, built by tools/prepare-base-data.sh: aligned, whitened crops), as
#    256-px JPEGs of quality 90. Every cartoon and held-out photo goes in; training photos
#    follow in a seeded shuffle (so every source is represented) until MAX_MIB is reached
#    (default: what the binary leaves of 62 MiB).
# The checkpoint the GPU run starts from, models/training/base-fast.safetensors, is tracked
# and travels with the working tree.
#
# Env: DATA, MAX_MIB, PYTHON with Pillow (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=${1:-.gpu-carry}
data=${DATA:-$HOME/toonbot-runs/data}
python=${PYTHON:-python3}
mkdir -p "$carry"
[ -f "$carry/toonbot" ] || { echo "copy the CUDA binary to $carry/toonbot first" >&2; exit 1; }
cp ../shared/data/samples/groups/sample1.jpg "$carry/group.jpg"
carried=$(($(stat -c %s "$carry/toonbot") + $(stat -c %s "$carry/group.jpg")))
max_mib=${MAX_MIB:-$(((62 * 1024 * 1024 - carried) / 1024 / 1024))}

"$python" - "$carry" "$data" "$max_mib" <<'PY'
import io, os, random, sys, tarfile
from PIL import Image

carry, data, max_mib = sys.argv[1], sys.argv[2], float(sys.argv[3])
budget = int(max_mib * 1024 * 1024)

def jpeg(path):
    img = Image.open(path).convert("RGB")
    if img.size != (256, 256):
        img = img.resize((256, 256), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()

def files(folder):
    return sorted(os.listdir(os.path.join(data, folder)))

path = os.path.join(carry, "data.tar")
used, counts = 0, {}
with tarfile.open(path + ".tmp", "w") as tar:
    def add(folder, name):
        global used
        body = jpeg(os.path.join(data, folder, name))
        if used + len(body) + 1024 > budget:
            return False
        info = tarfile.TarInfo(f"{folder}/{os.path.splitext(name)[0]}.jpg")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        used += len(body) + 1024
        counts[folder] = counts.get(folder, 0) + 1
        return True

    for folder in ("cartoons-train", "photos-val"):
        for name in files(folder):
            if not add(folder, name):
                sys.exit(f"MAX_MIB={max_mib} does not hold {folder}")
    photos = files("photos-train")
    random.Random(0).shuffle(photos)
    for name in photos:
        if not add("photos-train", name):
            break
os.replace(path + ".tmp", path)
print(f"{path}: {used / 2**20:.1f} MiB, {counts}")
PY
du -sh "$carry"/*
