#!/usr/bin/env bash
# Compile-check (or build) phasekit's CUDA path on a machine without a GPU or a CUDA toolkit.
#
# candle's CUDA backend compiles its kernels to PTX with `nvcc` at build time. This script
# installs CUDA's compiler from PyPI (nvidia-cuda-nvcc & co., about 270 MB) into .cuda/
# (git-ignored), points the build at it and runs `cargo check --features cuda` (default) or the
# cargo command given as arguments, e.g.
#     scripts/check-cuda.sh                                   # cargo check --features cuda
#     scripts/check-cuda.sh build --release --features cuda   # a binary to run on a GPU machine
#     scripts/check-cuda.sh build --release --features nccl   # the same with NCCL (multi-GPU)
#     scripts/check-cuda.sh ptxas                             # register/spill report of kernels/*.cu
# (build.rs compiles kernels/*.cu to PTX with the same nvcc.)
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
if [ "$1" = ptxas ]; then
    # What the driver will make of the PTX on an sm_${CUDA_COMPUTE_CAP} GPU: registers, shared
    # memory, stack frame and spills per kernel (ptxas -v), for docs/ops.md.
    out="$PWD/target-cuda/ptxas"
    mkdir -p "$out"
    for cu in kernels/*.cu; do
        echo "== $cu (sm_${CUDA_COMPUTE_CAP})"
        nvcc -cubin -std=c++17 -O3 --expt-relaxed-constexpr -Ikernels -arch="sm_${CUDA_COMPUTE_CAP}" -Xptxas -v \
            -o "$out/$(basename "$cu" .cu).cubin" "$cu" 2>&1 | grep -E "Compiling entry|Used|spill|stack frame" \
            | sed -E "s/ptxas info *: //"
    done
    exit 0
fi
if [ "$1" = build ] || [ "$1" = test ]; then
    # Linking needs libcuda, cuBLAS(Lt), cuRAND, NVRTC and (with --features nccl) NCCL, which
    # PyPI's compiler wheels do not ship (and libcuda comes with the driver). Link against stubs
    # that carry the real sonames and the symbols the objects use; at run time the GPU machine's
    # real libraries are loaded (candle links cudarc dynamically: a binary built with nccl needs
    # libnccl.so.2 there, as one built with cuda needs libcuda.so.1).
    lib="$root/lib"
    if [ ! -e "$lib/libcublas.so" ] || [ ! -e "$lib/libnccl.so" ]; then
        cargo "$@" --lib
        profile=debug
        for a in "$@"; do [ "$a" = --release ] && profile=release; done
        nm --undefined-only "$CARGO_TARGET_DIR/$profile"/deps/lib{cudarc,candle_core,candle_kernels,phasekit}-*.rlib 2>/dev/null \
            | awk '{print $2}' | sort -u > "$PWD/.cuda/undefined.txt"
        python3 - "$PWD/.cuda/undefined.txt" "$lib" <<'PY'
import subprocess, sys
syms = [l.strip() for l in open(sys.argv[1]) if l.strip()]
libs = {
    "cuda": ("libcuda.so.1", lambda s: s.startswith("cu") and s[2:3].isupper()),
    "nvrtc": ("libnvrtc.so.13", lambda s: s.startswith("nvrtc")),
    "curand": ("libcurand.so.10", lambda s: s.startswith("curand")),
    "cublasLt": ("libcublasLt.so.13", lambda s: s.startswith("cublasLt")),
    "cublas": ("libcublas.so.13", lambda s: s.startswith("cublas") and not s.startswith("cublasLt")),
    "nccl": ("libnccl.so.2", lambda s: s.startswith("nccl")),
}
for name, (soname, pred) in libs.items():
    src = "".join(f"void {s}(void){{}}\n" for s in syms if pred(s))
    c = f"{sys.argv[2]}/stub_{name}.c"
    open(c, "w").write(src)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", f"{sys.argv[2]}/lib{name}.so", f"-Wl,-soname,{soname}", c], check=True)
PY
        ln -sf libcudart.so.13 "$lib/libcudart.so"
    fi
fi
exec cargo "$@"
