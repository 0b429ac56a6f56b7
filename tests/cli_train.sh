#!/bin/sh
# cli_train.sh - smoke tests of `eformer train`, `eval` and `generate` (CTest cli_train_*):
#
#   sh tests/cli_train.sh CASE /path/to/eformer
#
#   learn      a tiny model learns dup:len=16,symbols=4: final eval accuracy >= 0.9 (chance is
#              0.25; such models sit at ~0.5 for a while before they find the copy)
#   resume     6 steps = 3 steps + save + resume to 6, bit for bit (cmp of both files), with
#              --stop-at (cosine) and with --steps 3 then --steps 6 (constant); accumulation;
#              a resumed run given other options is refused (exit status 2)
#   interrupt  SIGINT stops a long run: status 130, the default checkpoint exists, eval reads
#              it and train resumes it; SIGTERM: status 143, the --save checkpoint
#   generate   a byte-level model trained on a printf'd text continues its prompt (also a linear
#              model, by incremental decoding, past max_len); sampling
#              gives --max-new bytes; eval reports bpb; a non-byte-level model is refused (2)
#   timelimit  --time-limit 1 ends a 10^6-step run with status 0, a stop record, the final
#              eval and the checkpoint; --time-limit 0 is refused
#   usage      unknown task, non-causal attention for a causal task, ... : exit status 2; a
#              head= in --model that matches the task's runs (pool=mean)
#
# Every case runs in a new temporary folder (removed afterwards) with one thread, so that the
# suite's other tests do not slow it down. Exit status 0 = pass.
set -u
name=${1:?case}
E=${2:?eformer}
dir=$(mktemp -d) || exit 1
trap 'rm -rf "$dir"' EXIT
cd "$dir" || exit 1

T=dup:len=16,symbols=4
M=layers=1,dim=32,heads=2,attn=flash:causal=1

fail() {
    echo "FAIL: $*"
    exit 1
}

# wait_for FILE PATTERN: up to 30 s for the line (a run's header) to appear
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le 300 ] || fail "no '$2' in $1 after 30 s"
        sleep 0.1
    done
}

# expect_status WANT command...: runs it, shows its output, checks the exact exit status
expect_status() {
    want=$1
    shift
    "$@"
    got=$?
    [ "$got" -eq "$want" ] || fail "exit status $got, expected $want: $*"
    echo "ok: exit status $got: $*"
}

case $name in
learn)
    out=$("$E" train --task $T --model $M --batch 16 --lr 3e-3 --warmup 50 --steps 1500 \
        --eval-every 500 --eval-samples 200 --log-every 250 --threads 1 --json) ||
        fail "train failed"
    printf '%s\n' "$out"
    acc=$(printf '%s\n' "$out" | grep '"split":"eval"' | tail -n 1 |
        sed 's/.*"acc":\([^,}]*\).*/\1/')
    awk -v a="$acc" 'BEGIN { exit !(a >= 0.9) }' || fail "final eval accuracy '$acc' < 0.9"
    echo "ok: final eval accuracy $acc"
    ;;
resume)
    common="--task $T --model $M --warmup 2 --eval-samples 16 --log-every 1 --threads 1"
    "$E" train $common --steps 6 --save full.st || fail "train 6 steps"
    "$E" train $common --steps 6 --stop-at 3 --save half.st || fail "train to step 3 of 6"
    "$E" train --resume half.st --threads 1 || fail "resume to step 6"
    cmp full.st half.st || fail "6 steps != 3 steps + resume (model)"
    cmp full.st.opt half.st.opt || fail "6 steps != 3 steps + resume (optimizer state)"
    echo "ok: cosine 6 steps = 3 + resume"
    "$E" train $common --sched constant --steps 6 --save c6.st || fail "constant 6 steps"
    "$E" train $common --sched constant --steps 3 --save c3.st || fail "constant 3 steps"
    "$E" train --resume c3.st --steps 6 --threads 1 || fail "constant resume to 6"
    cmp c6.st c3.st || fail "constant: 6 steps != 3 steps + resume --steps 6"
    echo "ok: constant --steps 3, then --resume --steps 6"
    "$E" train $common --batch 2 --accum 3 --steps 4 --save a4.st || fail "accum 4 steps"
    "$E" train $common --batch 2 --accum 3 --steps 4 --stop-at 1 --save a1.st || fail "accum 1"
    "$E" train --resume a1.st --threads 1 || fail "accum resume"
    cmp a4.st a1.st || fail "accum: 4 steps != 1 step + resume"
    echo "ok: accum 3: 4 steps = 1 + resume"
    expect_status 2 "$E" train --resume half.st --lr 0.01
    expect_status 2 "$E" train --resume half.st --steps 12
    expect_status 2 "$E" train --resume half.st --task dup:len=18,symbols=4
    expect_status 2 "$E" train --resume half.st --model layers=2,dim=32,heads=2,attn=flash:causal=1
    ;;
interrupt)
    "$E" train --task $T --model $M --steps 1000000 --log-every 100000 --threads 1 >log 2>err &
    pid=$!
    wait_for log '^# optim'
    sleep 1
    kill -INT $pid
    wait $pid
    st=$?
    cat log err
    [ "$st" -eq 130 ] || fail "SIGINT: exit status $st, expected 130"
    [ -f eformer-interrupted.safetensors ] && [ -f eformer-interrupted.safetensors.opt ] ||
        fail "no checkpoint eformer-interrupted.safetensors(.opt)"
    grep -q "checkpoint written to eformer-interrupted.safetensors" err ||
        fail "the message does not say where the checkpoint is"
    "$E" eval --load eformer-interrupted.safetensors --eval-samples 50 --threads 1 ||
        fail "eval of the interrupted checkpoint"
    n=$(sed -n 's/.* at step \([0-9]*\) of .*/\1/p' err)
    [ -n "$n" ] || fail "no step in the message"
    "$E" train --resume eformer-interrupted.safetensors --stop-at $((n + 2)) --eval-samples 8 \
        --threads 1 || fail "resume of the interrupted checkpoint"
    echo "ok: SIGINT at step $n"
    "$E" train --task $T --model $M --steps 1000000 --log-every 100000 --threads 1 \
        --save term.st >log 2>err &
    pid=$!
    wait_for log '^# optim'
    sleep 1
    kill -TERM $pid
    wait $pid
    st=$?
    cat log err
    [ "$st" -eq 143 ] || fail "SIGTERM: exit status $st, expected 143"
    [ -f term.st ] && [ -f term.st.opt ] || fail "no checkpoint term.st(.opt)"
    echo "ok: SIGTERM"
    ;;
generate)
    i=0
    while [ $i -lt 400 ]; do
        printf 'the cat sat on the mat.\n'
        i=$((i + 1))
    done >fix.txt
    "$E" train --task text:fix.txt,len=32 --model $M --steps 600 --batch 8 --lr 3e-3 \
        --warmup 20 --log-every 200 --threads 1 --save t.st || fail "train on fix.txt"
    out=$("$E" generate --load t.st --prompt "the cat" --max-new 24 --temperature 0 --threads 1) ||
        fail "generate"
    printf '%s\n' "$out"
    case $out in
    "the cat sat on the mat."*) echo "ok: greedy continuation" ;;
    *) fail "greedy continuation of 'the cat' is not 'the cat sat on the mat.'" ;;
    esac
    n=$("$E" generate --load t.st --prompt "the cat" --max-new 24 --seed 5 --threads 1 | wc -c)
    [ "$n" -eq 31 ] || fail "sampling wrote $n bytes, expected 7 + 24"
    "$E" eval --load t.st --json --threads 1 | tee eval.json
    grep -q '"split":"eval".*"bpb":' eval.json || fail "no bpb in eval --json of a text task"
    # a linear-attention model generates by incremental decoding (ef_model_decoder), past
    # max_len (32) too, where it falls back to recomputing the window
    "$E" train --task text:fix.txt,len=32 --model layers=1,dim=32,heads=2,attn=linear:causal=1 \
        --steps 600 --batch 8 --lr 3e-3 --warmup 20 --log-every 200 --threads 1 --save l.st ||
        fail "train a linear model on fix.txt"
    out=$("$E" generate --load l.st --prompt "the cat" --max-new 60 --temperature 0 --threads 1) ||
        fail "generate (linear)"
    printf '%s\n' "$out"
    case $out in
    "the cat sat on the mat."*) echo "ok: greedy continuation by incremental decoding" ;;
    *) fail "linear: greedy continuation of 'the cat' is not 'the cat sat on the mat.'" ;;
    esac
    [ ${#out} -eq 67 ] || fail "linear: wrote ${#out} bytes, expected 7 + 60"
    "$E" train --task $T --model $M --steps 2 --warmup 0 --eval-samples 8 --threads 1 \
        --save d.st || fail "train a dup model"
    expect_status 2 "$E" generate --load d.st --prompt x
    ;;
timelimit)
    # --time-limit ends a long run like --steps would: status 0, a stop record, eval, checkpoint
    out=$("$E" train --task $T --model $M --steps 1000000 --sched constant --warmup 1 \
        --time-limit 1 --save t.st --threads 1 --json) || fail "train --time-limit failed"
    printf '%s\n' "$out" | tail -n 3
    printf '%s\n' "$out" | grep -q '"split":"stop".*"reason":"time-limit"' || fail "no stop record"
    printf '%s\n' "$out" | grep -q '"split":"eval"' || fail "no final eval"
    [ -s t.st ] && [ -s t.st.opt ] || fail "no checkpoint"
    expect_status 2 "$E" train --task $T --model $M --time-limit 0
    ;;
usage)
    expect_status 2 "$E" train --task nosuch:len=4 --model $M
    expect_status 2 "$E" train --task $T --model layers=1,dim=32,heads=2,attn=flash
    expect_status 2 "$E" train --task $T --model "layers=2,dim=32,heads=2,attn=local:window=4,causal=1|flash"
    expect_status 2 "$E" train --task $T
    expect_status 2 "$E" train --task $T --model $M --sched bogus
    expect_status 2 "$E" train --task $T --model $M --lr x
    expect_status 2 "$E" train --task $T --model $M --steps 10 --warmup 20
    expect_status 2 "$E" train --task $T --model $M --stop-at 5 --steps 4 --warmup 1
    expect_status 2 "$E" eval --load nothing.st
    # a head= of the user's own: the task's classes with another pool run; others are refused
    L=listops:eval=4
    LM=layers=1,dim=16,heads=2,attn=local:window=8
    expect_status 0 "$E" train --task $L --model $LM,head=cls:classes=10,pool=mean --steps 1 \
        --warmup 0 --batch 2 --threads 1
    expect_status 2 "$E" train --task $L --model $LM,head=cls:classes=3 --steps 1 --warmup 0 \
        --batch 2 --threads 1
    expect_status 2 "$E" train --task $T --model $M,head=cls:classes=4 --steps 1 --warmup 0
    expect_status 2 "$E" generate --load nothing.st
    "$E" help train | grep -q -- "--resume PATH" || fail "help train"
    "$E" help eval | grep -q -- "--load PATH" || fail "help eval"
    "$E" help generate | grep -q "incremental decoding" || fail "help generate"
    ;;
*)
    fail "unknown case '$name'"
    ;;
esac
echo "PASS: $name"
