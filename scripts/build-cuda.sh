#!/usr/bin/env bash
# Build (or lint) termtune with `--features cuda` on a machine with no GPU and no system CUDA.
#
# Installs NVIDIA's CUDA 13.0 toolchain pieces from PyPI into a cache folder, lays out a CUDA root that candle's
# build scripts understand (bin/, include/, nvvm/, lib/ with the unversioned .so links and a link-time libcuda stub),
# then runs cargo with it. CUDA 13.0 exactly: candle embeds PTX that the driver JIT-compiles, and PTX from a newer
# nvcc is rejected by a 13.0 driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
#
#   scripts/build-cuda.sh                          # cargo build --release --features cuda
#   scripts/build-cuda.sh clippy --all-targets -- -D warnings
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh      # A100 (90: H100/H200, the default; 89: L4/4090; 120: RTX 50xx)
#
# Environment: CUDA_COMPUTE_CAP (default 90), TERMTUNE_CUDA_ROOT (default ~/.cache/termtune/cuda-13.0),
# CARGO_TARGET_DIR (default target/cuda: a CPU build and a CUDA build do not evict each other).
# A cold build takes ~15 min on 2 cores (candle's kernels); keep the target dir and the compute capability.
set -euo pipefail
cd "$(dirname "$0")/.."

root=${TERMTUNE_CUDA_ROOT:-$HOME/.cache/termtune/cuda-13.0}
venv=$root/venv
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.0.19
)
if [ ! -f "$root/.installed" ]; then
  echo "== installing the CUDA 13.0 toolchain from PyPI into $root (~1.2 GB, once)"
  mkdir -p "$root"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${wheels[@]}"
  cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
  [ -x "$cu/bin/nvcc" ] || { echo "error: nvcc not found under $cu after the install" >&2; exit 1; }
  home=$root/home
  rm -rf "$home" && mkdir -p "$home/lib/stubs"
  for d in bin include nvvm; do ln -s "$cu/$d" "$home/$d"; done
  for f in "$cu"/lib/*.so.*; do ln -sf "$f" "$home/lib/$(basename "$f")"; done
  for l in cudart cublas cublasLt curand nvrtc; do
    v=$(ls "$cu"/lib/lib$l.so.* | head -1)
    ln -sf "$v" "$home/lib/lib$l.so"
  done
  ln -s lib "$home/lib64"
  cargo fetch --locked >/dev/null  # cudarc's sources, read for the stub below
  # Link-time stub of the driver library (libcuda.so.1 comes with the NVIDIA driver at run time): every cu*
  # symbol that cudarc declares. Never loaded at run time.
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -1)
  grep -oE 'fn (cu[A-Za-z0-9_]+)\(' "$sys" | sed -E 's/fn (.*)\(/int \1(void){return 100;}/' | sort -u \
    >"$home/lib/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/libcuda.c"
  ln -sf libcuda.so "$home/lib/stubs/libcuda.so.1"
  touch "$root/.installed"
fi
home=$root/home
export CUDA_HOME=$home CUDA_PATH=$home CUDA_ROOT=$home
export PATH=$home/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$home/lib/stubs:$home/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
if [ $# -eq 0 ]; then set -- build --release; fi
cmd=$1; shift
echo "== cargo $cmd --features cuda $* (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)"
cargo "$cmd" --features cuda "$@"
