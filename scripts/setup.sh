#!/usr/bin/env bash
# One-time (and idempotent) set-up of hpcdistill in ./.venv (VENV_DIR), for the MPI that MPICC names:
#   system MPI (the one on PATH, else Open MPI from apt), torch 2.13 (the CPU wheel, or on a GPU node
#   with a CUDA toolkit the CUDA wheel and Horovod with NCCL: section 1b), mpi4py, h5py,
#   Horovod 0.28.1 built from PyPI's source release against that torch (patched to C++17, and
#   scripts/horovod-latency.patch: no ~1 ms floor per collective) and cached
#   as a wheel, then hpcdistill itself in editable mode. A second run only checks and takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_DIR:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
WHEELS="${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcdistill/wheels}"
TORCH_VERSION=2.13.0
HOROVOD_VERSION=0.28.1
STAMP="$VENV/.hpcdistill-setup"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n"; fi
apt_usable() { command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; }
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. System MPI -------------------------------------------------------------------------------------
# MPICC names the MPI to build against (default: the mpicc on PATH); MPICC=mpicc.mpich is Debian's
# MPICH beside its Open MPI (installed with apt when missing). The launcher is the mpiexec of the same
# MPI (mpiexec.mpich for mpicc.mpich), recorded in the venv for hpcdistill.launch.
MPICC="${MPICC:-mpicc}"
if [ "$MPICC" = mpicc ] && { ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; }; then
  if apt_usable; then
    say "no MPI on PATH: installing Open MPI from apt"
    apt_install libopenmpi-dev openmpi-bin
  else
    die "no MPI compiler wrapper (mpicc) on PATH and apt is not usable here.
        Load your site's MPI first, e.g. 'module load openmpi' (or mpich / intel-mpi), then run again."
  fi
elif ! command -v "$MPICC" >/dev/null; then
  if [ "$MPICC" = mpicc.mpich ] && apt_usable; then
    say "MPICC=mpicc.mpich: installing MPICH from apt"
    apt_install mpich libmpich-dev
  else
    die "MPICC=$MPICC: no such compiler wrapper on PATH; load the MPI (module load ...) or give its path"
  fi
fi
suffix="${MPICC##*/mpicc}"; suffix="${suffix#mpicc}"
MPIEXEC="$(command -v "mpiexec$suffix" || command -v mpirun || true)"
[ -n "$MPIEXEC" ] || die "no mpiexec$suffix (or mpirun) next to $MPICC"
# No "| head" under pipefail: MPICH's mpiexec prints ~40 lines, and when head closed the pipe first
# mpiexec died of SIGPIPE and set -e ended set-up with exit 141 (CI, 2026-12-02).
mpi_version_text="$("$MPIEXEC" --version 2>&1 || true)"
MPI_VERSION="${mpi_version_text%%$'\n'*}"
case "$mpi_version_text" in *"Open MPI"*|*OpenRTE*) MPI_FLAVOR=openmpi ;; *HYDRA*|*MPICH*|*Intel*) MPI_FLAVOR=mpich ;; *) MPI_FLAVOR=unknown ;; esac
# The MPI's identity for the caches: its compile line (include and library paths) and launcher version.
MPI_ID="$({ "$MPICC" -show 2>/dev/null || "$MPICC" --showme 2>/dev/null; echo "$MPI_VERSION"; } | sha1sum | cut -c1-10)"
say "MPI: $(command -v "$MPICC") ($MPI_VERSION; launcher $MPIEXEC, $MPI_FLAVOR, id $MPI_ID)"

# 1b. CPU or GPU build ------------------------------------------------------------------------------
# HPCD_CUDA=auto (default): the GPU build where a GPU is visible (nvidia-smi) and a CUDA toolkit is
# there (nvcc on PATH or in CUDA_HOME): torch's CUDA wheel for that toolkit, Horovod with NCCL.
# HPCD_CUDA=no keeps the CPU build on a GPU node; HPCD_CUDA=yes insists on the GPU build.
# HPCD_SETUP_PLAN=1 prints the decisions and stops (what tests/test_setup.py checks).
HPCD_CUDA="${HPCD_CUDA:-auto}"
case "$HPCD_CUDA" in auto|yes|no) ;; *) die "HPCD_CUDA=$HPCD_CUDA: expected auto, yes or no" ;; esac
gpus="$( { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true)"
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/nvcc}"
[ -n "$NVCC" ] && [ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
BUILD=cpu
if [ "$HPCD_CUDA" != no ] && { [ "$gpus" -gt 0 ] || [ "$HPCD_CUDA" = yes ]; }; then
  [ -n "$NVCC" ] || die "$gpus GPU(s) visible but no CUDA toolkit (nvcc) on PATH or in CUDA_HOME: load it first
        ('module load cuda', or CUDA_HOME=/usr/local/cuda), then run again; HPCD_CUDA=no builds for the CPU."
  BUILD=gpu
fi
TORCH_INDEX="${HPCD_TORCH_INDEX:-}"
CUDA_TAG=cpu
if [ "$BUILD" = gpu ]; then
  CUDA_HOME="${CUDA_HOME:-$(cd "$(dirname "$NVCC")/.." && pwd)}"
  cuda_version="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p' | head -n1)"
  [ -n "$cuda_version" ] || die "cannot read the CUDA version from '$NVCC --version'"
  # torch publishes wheels for a few CUDA versions: the newest not above the toolkit's, same major
  # (Horovod's extension is compiled by this nvcc against torch's CUDA headers: the major must match).
  major="${cuda_version%%.*}"; minor="${cuda_version#*.}"
  case "$major" in
    12) if [ "$minor" -ge 8 ]; then CUDA_TAG=cu128; else CUDA_TAG=cu126; fi ;;
    13) CUDA_TAG=cu130 ;;
    *) die "CUDA $cuda_version: torch $TORCH_VERSION has wheels for CUDA 12.6, 12.8 and 13.0; load one of those
        ('module load cuda/12.8') or set HPCD_TORCH_INDEX to an index with a matching torch" ;;
  esac
  TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/$CUDA_TAG}"
fi
say "build: $BUILD (GPUs visible: $gpus; nvcc: ${NVCC:-none}${cuda_version:+, CUDA $cuda_version}; torch index: ${TORCH_INDEX:-pip default})"
if [ "${HPCD_SETUP_PLAN:-0}" = 1 ]; then
  printf 'build=%s\ncuda_tag=%s\ncuda_home=%s\ntorch_index=%s\nhorovod_gpu_operations=%s\n' \
    "$BUILD" "$CUDA_TAG" "${CUDA_HOME:-}" "$TORCH_INDEX" "$([ "$BUILD" = gpu ] && echo NCCL || echo none)"
  exit 0
fi

# Build tools Horovod needs (a C++17 compiler, cmake comes from pip below).
if ! command -v g++ >/dev/null || ! command -v make >/dev/null; then
  apt_usable || die "g++ and make are needed to build Horovod; install a C++ toolchain (module load gcc)."
  apt_install g++ make
fi

# 2. Virtual environment ----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' 2>/dev/null; then
    apt_usable || die "python3 -m venv is unavailable; install python3-venv."
    apt_install python3-venv
  fi
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# Fast path: everything already installed for this very tree and these versions.
PATCH="$ROOT/scripts/horovod-latency.patch"
patch_id="$(sha1sum "$PATCH" | cut -c1-12)"
want="torch=$TORCH_VERSION+$CUDA_TAG horovod=$HOROVOD_VERSION+$patch_id mpi=$MPI_ID pyproject=$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VPY" -c 'import horovod.torch, mpi4py, h5py, hpcdistill' 2>/dev/null; then
  say "already set up ($want)"
  exit 0
fi

# 3. Python packages --------------------------------------------------------------------------------
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch: PyPI's Linux wheel is the CUDA build, so the CPU build asks for torch's own CPU wheel (+cpu):
# from the pip sources configured here, else from download.pytorch.org; the GPU build from the index
# of the toolkit's CUDA version (1b).
if [ "$BUILD" = gpu ]; then
  "${PIP[@]}" install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple "torch==$TORCH_VERSION"
elif ! "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
  "${PIP[@]}" install --extra-index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_VERSION+cpu"
fi
"${PIP[@]}" install "torch==$TORCH_VERSION" numpy "cmake>=3.13,<4" packaging pyyaml cloudpickle psutil
# mpi4py compiled against this MPI (a prebuilt wheel would pick whichever libmpi the loader finds first).
# --no-cache-dir: pip caches a wheel it built from source under the sdist's name alone, so the second
# venv (.venv-mpich after .venv) silently got the mpi4py built for the first MPI (CI, 2026-12-02).
MPICC="$(command -v "$MPICC")" "${PIP[@]}" install --no-cache-dir --no-binary=mpi4py --force-reinstall --no-deps mpi4py
lib="$("$VPY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().replace(chr(0), "").splitlines()[0])')"
case "$MPI_FLAVOR:$lib" in
  openmpi:*"Open MPI"*|mpich:*MPICH*|mpich:*Intel*|mpich:*MVAPICH*|unknown:*) ;;
  *) die "mpi4py in $VENV runs on '$lib', not the $MPI_FLAVOR of $MPICC; remove $VENV and run again" ;;
esac
say "mpi4py on: $lib"
# The launcher of this MPI, for hpcdistill.launch (tests, benchmarks, reproduction).
printf 'HPCD_MPIEXEC=%s\nHPCD_MPI_FLAVOR=%s\n' "$MPIEXEC" "$MPI_FLAVOR" > "$VENV/hpcdistill-mpi.env"

# 4. Horovod, built once into a wheel cache ---------------------------------------------------------
mkdir -p "$WHEELS"
# not the wrapper's name: every Open MPI's mpicc is opal_wrapper. r2: the HOROVOD_WITH_* flags reach
# the build (before, a comment line inside the continued command left them unexported).
tag="torch$TORCH_VERSION+$CUDA_TAG-mpi$MPI_ID-r2"
wheel_dir="$WHEELS/horovod-$HOROVOD_VERSION-$patch_id-$tag"
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (takes ~5 min on 2 cores, once)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "${PIP[@]}" download --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
  tar -xzf "$work"/horovod-*.tar.gz -C "$work"
  src="$(echo "$work"/horovod-"$HOROVOD_VERSION")"
  # torch >= 2.1 headers need C++17; Horovod 0.28.1 asks for C++14 (horovod#3996, fixed after 0.28.1).
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || die "Horovod patch did not apply"
  # The ~1 ms floor of every collective (docs/benchmarks.md (a)): the background loop sleeps a whole
  # HOROVOD_CYCLE_TIME before it looks at a newly enqueued tensor, and synchronize() spins. The patch
  # wakes the loop on enqueue and blocks synchronize() on a condition variable (HOROVOD_WAKE_ON_ENQUEUE=0
  # restores the stock loop); tests/test_horovod.py checks it is in the build.
  if ! command -v patch >/dev/null; then apt_usable && apt_install patch; fi
  if command -v patch >/dev/null; then
    patch -d "$src" -p1 --forward --quiet < "$PATCH" || die "scripts/horovod-latency.patch did not apply"
  else
    git -C "$src" apply -p1 "$PATCH" || die "scripts/horovod-latency.patch did not apply (no \`patch\`; git apply failed)"
  fi
  mkdir -p "$wheel_dir.tmp"
  # Horovod's CMake finds MPI through `mpicc`/`mpicxx` on PATH: point them at this MPI.
  mpibin="$work/mpibin"; mkdir -p "$mpibin"
  ln -sf "$(command -v "$MPICC")" "$mpibin/mpicc"
  cxx="$(command -v "mpicxx$suffix" || command -v "mpic++$suffix" || true)"
  [ -z "$cxx" ] || ln -sf "$cxx" "$mpibin/mpicxx"
  ln -sf "$MPIEXEC" "$mpibin/mpiexec"
  gpu_env=()
  if [ "$BUILD" = gpu ]; then
    # NCCL: the system's (HOROVOD_NCCL_HOME, or nccl.h in a system path) or the nvidia-nccl wheel that
    # torch's CUDA build brings, given the unversioned libnccl.so that CMake looks for.
    nccl="${HOROVOD_NCCL_HOME:-}"
    if [ -z "$nccl" ] && [ ! -f /usr/include/nccl.h ]; then
      wheel_nccl="$("$VPY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)"
      [ -f "$wheel_nccl/include/nccl.h" ] || die "no NCCL: set HOROVOD_NCCL_HOME (or 'module load nccl')"
      nccl="$work/nccl"; mkdir -p "$nccl/lib"
      ln -s "$wheel_nccl/include" "$nccl/include"
      ln -s "$wheel_nccl"/lib/libnccl.so.* "$nccl/lib/"; libs=("$wheel_nccl"/lib/libnccl.so.*); ln -s "${libs[0]}" "$nccl/lib/libnccl.so"
    fi
    gpu_env=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_HOME" HOROVOD_NCCL_LINK=SHARED
             ${nccl:+HOROVOD_NCCL_HOME="$nccl"})
  fi
  env "${gpu_env[@]}" \
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI CMAKE_POLICY_VERSION_MINIMUM=3.5 \
  MAKEFLAGS="-j$(nproc)" PATH="$VENV/bin:$mpibin:$PATH" \
    "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$wheel_dir.tmp" "$src"
  rm -rf "$wheel_dir"; mv "$wheel_dir.tmp" "$wheel_dir"
fi
"${PIP[@]}" install --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl

# 5. hpcdistill itself ------------------------------------------------------------------------------
"${PIP[@]}" install -e "$ROOT[test]"
"$VPY" -c 'import horovod.torch as hvd, mpi4py, h5py, hpcdistill' || die "import check failed"
echo "$want" > "$STAMP"
say "done: activate with 'source $VENV/bin/activate'"
