#!/usr/bin/env bash
# The README's performance tables, re-measured on one H100/H200 with the commands that produced them. Each part
# writes PART.log (the table comes last) and PART.json into OUT; PARTS picks and orders them (all, about 25
# minutes: tests 3-5, decode 6, serve 3, train 4, moe 4, prefill 2). Needs the serve extra (fastapi, uvicorn) for
# `serve`, and transformers serve's (openai 1.x) for its transformers row. Every part runs under its own time
# limit (LIMIT_part seconds), so one that hangs leaves the rest their time.
#   PARTS="decode serve" OUT=/tmp/perf bash docs/perf_tables_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/perf_tables}
PARTS=${PARTS:-tests decode serve train moe prefill}
DSMOE=(python3 -m dsmoe)
mkdir -p "$OUT"

part() {  # name, then the command
    local name=$1 limit_var="LIMIT_$1" t0=$SECONDS
    shift
    timeout "${!limit_var:-600}" "$@" > "$OUT/$name.log" 2>&1
    echo "RESULT $name: exit $? after $((SECONDS - t0)) s, $OUT/$name.log"
}

for p in $PARTS; do
    case $p in
    tests)   # in parallel where pytest-xdist is installed, but the >2^31-offset V3 test (43 GB) alone after
             part tests bash -c 'python3 -m pytest -m gpu -q -p no:cacheprovider tests -k "not beyond_int32_offsets" \
                 $(python3 -c "import xdist" 2>/dev/null && printf -- "-n 4"); a=$?; \
                 python3 -m pytest -m gpu -q -p no:cacheprovider tests -k beyond_int32_offsets; exit $((a | $?))' ;;
    decode)  part decode "${DSMOE[@]}" bench decode --variants graphs,compiled --hf-impls grouped_mm \
                 --quantize fp8,int8 --profile --json "$OUT/decode.json" ;;
    serve)   part serve "${DSMOE[@]}" bench serve --preset small --servers dsmoe,transformers \
                 --request-rates 4,16,inf --num-prompts 96 --concurrency 32 --startup-timeout 120 \
                 --json "$OUT/serve.json" ;;
    train)   part train "${DSMOE[@]}" bench train --preset small --micro-batch 8 --seq-len 2048 --steps 10 \
                 --warmup 3 --variants trainer+compile hf-grouped_mm --profile --json "$OUT/train.json" ;;
    moe)     part moe "${DSMOE[@]}" bench moe --cuda-graphs --slow-max-tokens 512 --json "$OUT/moe.json" ;;
    prefill) part prefill "${DSMOE[@]}" bench prefill --presets small,deepseek-v2-lite --batch-sizes 1,8 \
                 --json "$OUT/prefill.json" ;;
    *)       echo "unknown part $p (tests decode serve train moe prefill)"; exit 2 ;;
    esac
done
