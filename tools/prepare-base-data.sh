#!/usr/bin/env bash
# Builds the base style's training and held-out folders from ../shared/data, outside the
# repository (the datasets are never copied into it; the folders hold `toonbot prepare`
# crops and symbolic links to the shared cartoons):
#   DIR/photos-train    aligned, whitened crops of photos/p2c-aligned/train, photos/celeba and
#                       photos/selfies, less the held-out ones
#   DIR/photos-val      photos/p2c-aligned/test and every 25th CelebA face (men and women of
#                       all ages): the reconstruction check, sample grids, KID and identity
#   DIR/cartoons-train  cartoons/p2c/train less every 6th image
#   DIR/cartoons-val    those held-out sixths and cartoons/p2c/test
# Usage: tools/prepare-base-data.sh [DIR]   (default ~/toonbot-runs/data; needs a release
# build: cargo build --release). Running it again keeps the crops already made.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath ../shared/data)
dir=${1:-$HOME/toonbot-runs/data}
bin=${TOONBOT_BIN:-target/release/toonbot}
for set in p2c-aligned/train p2c-aligned/test celeba selfies; do
  out="$dir/prepared/${set//\//-}"
  if [ ! -d "$out" ]; then
    rm -rf "$out.tmp"
    # Exit status 2 means some photos had no face: they are left out, the rest are kept.
    "$bin" prepare --photos "$data/photos/$set" --out "$out.tmp" || [ $? -eq 2 ]
    mv "$out.tmp" "$out"
  fi
done
rm -rf "$dir/photos-train" "$dir/photos-val" "$dir/cartoons-train" "$dir/cartoons-val"
mkdir -p "$dir/photos-train" "$dir/photos-val" "$dir/cartoons-train" "$dir/cartoons-val"
link() { ln -s "$(realpath "$1")" "$2/$(basename "$1")"; }
for f in "$dir"/prepared/p2c-aligned-train/* "$dir"/prepared/selfies/*; do link "$f" "$dir/photos-train"; done
for f in "$dir"/prepared/p2c-aligned-test/*; do link "$f" "$dir/photos-val"; done
i=0
for f in "$dir"/prepared/celeba/*; do
  if (( i % 25 == 0 )); then link "$f" "$dir/photos-val"; else link "$f" "$dir/photos-train"; fi
  i=$((i + 1))
done
i=0
for f in "$data"/cartoons/p2c/train/*; do
  if (( i % 6 == 5 )); then link "$f" "$dir/cartoons-val"; else link "$f" "$dir/cartoons-train"; fi
  i=$((i + 1))
done
for f in "$data"/cartoons/p2c/test/*; do link "$f" "$dir/cartoons-val"; done
for d in photos-train photos-val cartoons-train cartoons-val; do
  echo "$d: $(ls "$dir/$d" | wc -l) images"
done
