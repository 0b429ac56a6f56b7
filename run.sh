#!/usr/bin/env bash
# run.sh - the two set-up commands of the README, on a fresh Debian machine:
#   ./run.sh arena [OPTIONS]  install missing packages, build, run `eformer arena` (the main job:
#                             every mechanism over 1K-16K tokens; report in arena/report.md)
#   ./run.sh bench            install missing packages, build, run the benchmark sweep
#   ./run.sh data             install the training data packages, write data/kjv.txt
#   ./run.sh twin             install PyTorch, check the PyTorch twin against eformer, compare speed
#   ./run.sh fuzz [SECONDS]   install clang and libFuzzer, build the fuzz targets (fuzz/) in
#                             build-fuzz/, run each for SECONDS (default 30) on a copy of its
#                             seed corpus; a crash, leak or sanitizer report fails
#   ./run.sh coverage         build with gcov in build-cov/, run every test, report line coverage
#                             per file of src/ and each error return (ef_error) no test reaches
#                             (build-cov/coverage.txt)
#   ./run.sh test [--sanitize|--portable]
#                             install missing packages, build, run every test (CTest);
#                             --sanitize builds with AddressSanitizer + UBSan in build-asan/,
#                             --portable without -march=native (SSE2 vector code) in build-portable/
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages eformer needs to build and run. The GEMM library (oneDNN) is loaded at run
# time; without it eformer falls back to OpenBLAS, BLIS or its built-in kernel (docs/gemm.md).
# gnuplot-nox draws the arena's plots.
PACKAGES=(cmake make gcc libc6-dev libdnnl2 libpng-dev libcjson-dev zlib1g-dev gnuplot-nox)
# The data of the training tasks (docs/tasks.md), only for `./run.sh data`: the King James
# Bible (text task; the `bible` program writes it out) and Fashion-MNIST (image task, read from
# /usr/share/datasets/fashion-mnist).
DATA_PACKAGES=(bible-kjv dataset-fashion-mnist)

install_missing() { # install_missing [package...]   (default: PACKAGES)
    local missing=() wanted=("$@")
    [ ${#wanted[@]} -eq 0 ] && wanted=("${PACKAGES[@]}")
    for p in "${wanted[@]}"; do
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
arena)
    install_missing
    build build
    shift
    ./build/eformer info
    ./build/eformer arena "$@"
    ;;
bench)
    install_missing
    build build
    ./build/eformer info
    ./build/eformer bench --sweep
    ;;
data)
    install_missing "${DATA_PACKAGES[@]}"
    mkdir -p data
    if [ ! -s data/kjv.txt ]; then
        # the whole Bible, one verse a line ("Ge1:1 In the beginning ..."), 4,404,412 bytes
        bible -f gen1:1-rev22:21 >data/kjv.txt.tmp
        mv data/kjv.txt.tmp data/kjv.txt
        echo "run.sh: wrote data/kjv.txt ($(wc -c <data/kjv.txt) bytes)"
    else
        echo "run.sh: data/kjv.txt is there ($(wc -c <data/kjv.txt) bytes)"
    fi
    ;;
twin)
    # the PyTorch twin of the model (bench/README.md): Debian's torch needs an optimised
    # libblas.so.3, which libopenblas0-openmp provides
    install_missing
    install_missing python3-torch libopenblas0-openmp
    build build
    /usr/bin/python3 bench/twin_check.py
    for a in "flash:causal=1" "local:window=128,causal=1"; do
        /usr/bin/python3 bench/torch_twin.py --compare --threads 2 --len 1024 --batch 4 --reps 3 \
            --model "layers=2,dim=256,heads=4,ff=1024,vocab=256,max_len=1024,attn=$a"
    done
    ;;
test)
    install_missing
    # the Python front end's tests (python/tests): Debian's numpy, torch (which needs an
    # optimised libblas.so.3: libopenblas0-openmp) and pytest
    install_missing python3-numpy python3-torch python3-pytest libopenblas0-openmp
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
coverage)
    install_missing
    build build-cov -DEF_COVERAGE=ON -DCMAKE_BUILD_TYPE=Debug
    find build-cov -name '*.gcda' -delete
    (cd build-cov && ctest -j 2 --output-on-failure)
    rm -rf build-cov/gcov && mkdir build-cov/gcov
    (cd build-cov/gcov && find ../CMakeFiles/eformer_objs.dir -name '*.gcda' -exec gcov -p -o {} {} \; >/dev/null)
    # per file: executed lines / executable lines, reached error returns / all; then the
    # error returns never reached (the lines gcov marks #####)
    {
        total_x=0 total_l=0 total_e=0 total_r=0
        for f in build-cov/gcov/*"#src#"*.c.gcov; do
            name=src/${f##*#src#}
            name=${name%.gcov}
            name=${name//#//}
            x=$(grep -cE '^ +[0-9]+[*]?:' "$f" || true)
            u=$(grep -cE '^ +#####:' "$f" || true)
            e=$(grep -E 'ef_error[(]' "$f" | grep -cE '^ +([0-9]+[*]?|#####):' || true)
            eu=$(grep -E 'ef_error[(]' "$f" | grep -cE '^ +#####:' || true)
            printf '%-28s lines %5d / %5d   error returns reached %3d / %3d\n' "$name" "$x" \
                $((x + u)) $((e - eu)) "$e"
            total_x=$((total_x + x)) total_l=$((total_l + x + u))
            total_e=$((total_e + e)) total_r=$((total_r + e - eu))
        done
        printf '%-28s lines %5d / %5d   error returns reached %3d / %3d\n' total "$total_x" \
            "$total_l" "$total_r" "$total_e"
        echo
        echo "error returns no test reaches:"
        for f in build-cov/gcov/*"#src#"*.c.gcov; do
            name=src/${f##*#src#}
            name=${name%.gcov}
            name=${name//#//}
            grep -E 'ef_error[(]' "$f" | grep -E '^ +#####:' |
                sed -E "s|^ +#####: +([0-9]+):(.*)|$name:\1:\2|" || true
        done
    } | tee build-cov/coverage.txt
    ;;
fuzz)
    install_missing
    install_missing clang libclang-rt-14-dev
    secs=${2:-30}
    CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Release -DEF_FUZZ=ON -DEF_WERROR=ON \
        >/dev/null
    targets=()
    for f in fuzz/fuzz_*.c; do targets+=("$(basename "$f" .c)"); done
    cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]}"
    # the built-in GEMM: oneDNN's own OpenMP runtime (libgomp) next to clang's (libomp) is
    # neither what the fuzzer is about nor quiet under LeakSanitizer
    export EF_BLAS=builtin
    for t in "${targets[@]}"; do
        corpus=$(mktemp -d)
        cp fuzz/corpus/"${t#fuzz_}"/* "$corpus"/
        echo "run.sh: $t for ${secs}s"
        log="$corpus.log"
        status=0
        # inputs up to 4 KB; checkpoints up to 8 KB (the seeds are tiny models saved whole)
        max_len=4096
        [ "$t" = fuzz_safetensors ] && max_len=8192
        ./build-fuzz/"$t" -max_total_time="$secs" -max_len="$max_len" -timeout=20 -rss_limit_mb=4096 \
            -seed=1 -print_final_stats=1 "$corpus" >"$log" 2>&1 || status=$?
        grep -E "^stat::number_of_executed_units|DONE" "$log" || true
        if [ "$status" -ne 0 ]; then
            tail -60 "$log"
            echo "run.sh: $t failed (status $status); the input is in the log above" >&2
            exit 1
        fi
        rm -rf "$corpus" "$log"
    done
    ;;
*)
    echo "usage: ./run.sh arena [OPTIONS] | bench | data | twin | coverage | fuzz [SECONDS] | test [--sanitize|--portable]" >&2
    exit 2
    ;;
esac
