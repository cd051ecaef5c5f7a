#!/usr/bin/env bash
# Builds toonbot with CUDA for Hopper (sm_90; H100/H200), DESIGN.md §8, on a machine
# without a CUDA toolkit: nvcc, the CUDA runtime headers and CCCL come from PyPI into a
# virtual environment (.venv-cuda by default), then cargo builds with --features cuda.
#
#   tools/build-cuda.sh            # release build; prints the binary's path last
#   tools/build-cuda.sh check      # cargo check --features cuda (type-checks; still compiles
#                                  # candle's kernels to PTX in its build script)
#
# The kernels take about 8 minutes to compile on 2 cores, the whole release build about 20.
# The binary links libcuda (driver) and the cuBLAS/cuRAND libraries at run time: on the
# device, point LD_LIBRARY_PATH at PyTorch's CUDA 13 libraries (tools/gpu/train_base.sh does).
# Env: CUDA_VENV (venv path), PYTHON (python3 used to create it).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
venv=${CUDA_VENV:-.venv-cuda}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
# The -cu12 packages ship no nvcc; these are CUDA 13.x.
"$venv/bin/python" -m pip install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl
cuda_home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[ -x "$cuda_home/bin/nvcc" ] || { echo "no nvcc under $cuda_home" >&2; exit 1; }
export PATH="$cuda_home/bin:$PATH" CUDA_HOME="$cuda_home"
# cudarc knows CUDA versions up to 13.4; the 13.5 toolkit's PTX runs on 13.x drivers.
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13040
case "$mode" in
    check) cargo check --locked --features cuda --all-targets ;;
    build)
        cargo build --locked --release --features cuda
        target=$(cargo metadata --format-version 1 --no-deps |
            "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
        echo "$target/release/toonbot"
        ;;
    *) echo "usage: $0 [build|check]" >&2; exit 2 ;;
esac
