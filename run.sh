#!/usr/bin/env bash
# run.sh - the two set-up commands of the README, on a fresh Debian machine:
#   ./run.sh bench            install missing packages, build, run the default benchmark sweep
#   ./run.sh test [--sanitize|--portable]
#                             install missing packages, build, run every test (CTest);
#                             --sanitize builds with AddressSanitizer + UBSan in build-asan/,
#                             --portable without -march=native (SSE2 vector code) in build-portable/
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages eformer needs to build and run. The GEMM library (oneDNN) is loaded at run
# time; without it eformer falls back to OpenBLAS, BLIS or its built-in kernel (docs/gemm.md).
PACKAGES=(cmake make gcc libc6-dev libdnnl2 libpng-dev libcjson-dev zlib1g-dev)

install_missing() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "run.sh: installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build() { # build DIR [cmake options...]
    local dir=$1
    shift
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
    cmake --build "$dir" -j "$(nproc)"
}

cmd=${1:-}
case "$cmd" in
bench)
    install_missing
    build build
    ./build/eformer info
    ./build/eformer bench --sweep
    ;;
test)
    install_missing
    if [ "${2:-}" = "--sanitize" ]; then
        build build-asan -DEF_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DEF_WERROR=ON
        # LeakSanitizer crashes scanning oneDNN's worker threads, so the sanitized run uses the
        # built-in GEMM (which it thereby also covers)
        export EF_BLAS=builtin
        cd build-asan
    elif [ "${2:-}" = "--portable" ]; then
        build build-portable -DEF_NATIVE=OFF -DEF_WERROR=ON
        cd build-portable
    elif [ -n "${2:-}" ]; then
        echo "run.sh: unknown option '${2}' (expected --sanitize or --portable)" >&2
        exit 2
    else
        build build -DEF_WERROR=ON
        cd build
    fi
    ctest --output-on-failure -j 2
    ;;
*)
    echo "usage: ./run.sh bench | ./run.sh test [--sanitize|--portable]" >&2
    exit 2
    ;;
esac
