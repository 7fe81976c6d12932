#!/usr/bin/env bash
# Build a wheelhouse for the device install, so a station installs with no compiler and no network:
#   pip install --no-index --find-links WHEELHOUSE 'patchcore-edge[io,sign]'
#
# Every runtime dependency has binary wheels for x86_64 and aarch64 (Python 3.10-3.12); they are downloaded as
# they are, and nothing is compiled: the device searches the bundle's HNSW graph with faiss-cpu (wheels with run-time
# SIMD dispatch), not hnswlib.
#
# Only a station that sets `inference.knn: hnswlib` needs hnswlib (WITH_HNSWLIB=1). hnswlib 0.8.0 ships as source
# only, and its setup.py compiles with -march=native: a wheel built on one CPU can die with SIGILL (illegal
# instruction) on an older one. Its setup.py drops -march=native when HNSWLIB_NO_NATIVE is set; CFLAGS then picks
# the instruction-set floor (ISA below).
#
# Usage (run it on a machine of the TARGET architecture, e.g. once on one Pi, or under qemu/`docker buildx`):
#   [WITH_HNSWLIB=1] [EXTRAS=io,sign] device_configs/build_wheelhouse.sh [OUT_DIR] [ISA]
#     EXTRAS   default io,sign: the package extras whose wheels are collected (add page for the operator's page,
#              opcua for the OPC UA server, e.g. EXTRAS=io,sign,page,opcua); the core runtime is always included
#     OUT_DIR  default ./wheelhouse
#     ISA      (WITH_HNSWLIB=1 only) portable (default): the architecture's baseline (x86-64 = SSE2; aarch64 = armv8-a, which includes
#                                  NEON): runs on every CPU of that architecture (Pi 4, Pi 5, Jetson, any PC)
#              x86-64-v3:          AVX2 + FMA floor (every Intel since Haswell 2013, AMD since Excavator/Zen):
#                                  hnswlib's AVX distance kernels, SIGILL on Atom/Celeron parts without AVX2
#              native:             hnswlib's own default (-march=native): only for the machine that built it
# The hnswlib wheel's file name carries no ISA, so keep one wheelhouse per ISA (OUT_DIR/<isa> is a good habit).
set -euo pipefail

OUT=${1:-wheelhouse}
ISA=${2:-portable}
PY=${PYTHON:-python3}
HNSWLIB_VERSION=${HNSWLIB_VERSION:-0.8.0}
EXTRAS=${EXTRAS:-io,sign}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

case "$ISA" in
  portable)  export HNSWLIB_NO_NATIVE=1; export CFLAGS="${CFLAGS:-} -O3" ;;
  x86-64-v3) export HNSWLIB_NO_NATIVE=1; export CFLAGS="${CFLAGS:-} -O3 -march=x86-64-v3" ;;
  native)    unset HNSWLIB_NO_NATIVE ;;
  *) echo "ISA must be portable, x86-64-v3 or native, got '$ISA'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

if [ "${WITH_HNSWLIB:-0}" = 1 ]; then
  echo "== hnswlib $HNSWLIB_VERSION from source ($ISA, $(uname -m)); needs g++ and the Python headers here only"
  # --no-binary hnswlib: never reuse a wheel from pip's cache (it may have been built with -march=native).
  "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary hnswlib "hnswlib==$HNSWLIB_VERSION" -w "$OUT"
fi

echo "== binary wheels of everything else the device runs, extras [$EXTRAS] (no torch: the 'export' extra is never installed there)"
"$PY" -m pip wheel --no-deps "$REPO" -w "$OUT"
# The dependency list is read from the package's own metadata (pyproject.toml), never repeated here: a
# hand-kept list once missed paho-mqtt and the documented install below failed on every station.
WHEEL=$(ls -t "$OUT"/patchcore_edge-*.whl | head -n 1)
"$PY" -m pip download --only-binary=:all: -d "$OUT" "$WHEEL[$EXTRAS]"

echo "== wheelhouse $OUT ready; on the device:"
echo "   pip install --no-index --find-links $OUT 'patchcore-edge[$EXTRAS]'"
