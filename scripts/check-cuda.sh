#!/usr/bin/env bash
# Compile-check (or build) phasekit's CUDA path on a machine without a GPU or a CUDA toolkit.
#
# candle's CUDA backend compiles its kernels to PTX with `nvcc` at build time. This script
# installs CUDA's compiler from PyPI (nvidia-cuda-nvcc & co., about 270 MB) into .cuda/
# (git-ignored), points the build at it and runs `cargo check --features cuda` (default) or the
# cargo command given as arguments, e.g.
#     scripts/check-cuda.sh                                   # cargo check --features cuda
#     scripts/check-cuda.sh build --release --features cuda   # a binary to run on a GPU machine
# Environment: CUDA_SERIES (default 13.0: PTX must not be newer than the GPU driver, and a
# 580-series driver runs CUDA 13.0), CUDA_COMPUTE_CAP (default 90: H100/H200),
# CARGO_TARGET_DIR (default target-cuda/, so CPU and CUDA builds do not evict each other).
set -euo pipefail
cd "$(dirname "$0")/.."

series="${CUDA_SERIES:-13.0}"
prefix="$PWD/.cuda/py"
root="$prefix/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ] || ! grep -q "^Version: ${series}\." "$prefix"/nvidia_cuda_nvcc-*.dist-info/METADATA 2>/dev/null; then
    echo "installing CUDA ${series} compiler from PyPI into .cuda/ ..." >&2
    rm -rf "$prefix"
    python3 -m pip install --quiet --disable-pip-version-check --target "$prefix" \
        "nvidia-cuda-nvcc==${series}.*" "nvidia-cuda-runtime==${series}.*" "nvidia-cuda-crt==${series}.*" \
        "nvidia-nvvm==${series}.*" "nvidia-cuda-cccl==${series}.*"
fi

export PATH="$root/bin:$PATH"
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
# The wheels keep the CCCL headers (cuda/std, thrust, cub) one level down, in include/cccl.
export NVCC_PREPEND_FLAGS="${NVCC_PREPEND_FLAGS:-} -I$root/include -I$root/include/cccl"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
major="${series%%.*}"; minor="${series#*.}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-$((major * 1000 + minor * 10))}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
nvcc --version | tail -1 >&2
if [ $# -eq 0 ]; then
    set -- check --features cuda --all-targets
fi
exec cargo "$@"
