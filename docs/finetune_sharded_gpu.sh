#!/usr/bin/env bash
# Issue 13, sharded loading of a base on GPUS GPUs of one host (about 10 minutes on 4 H200s): the DeepSeek-V2-Lite
# shape (15.7B parameters, random bf16 weights, 31 GB on disk) under torchrun, each rank reading only its own shards
# (FSDP2 x expert parallelism over all GPUs). Prints, per rank, the GPU and host memory of building the model
# (LoRA on a bf16 base; full fine-tuning in fp32, 63 GB whole), then 6 LoRA steps: tokens/s, peak GPU memory
# (rank 0) and each rank's host peak RSS. FULL=1 adds 6 steps of full fine-tuning in bf16 (writes a 31 GB export).
# TOK: a folder with tokenizer.json (default: one made by a 1-step `dsmoe train --preset tiny`).
# Read the lines starting with "RESULT".
set -euo pipefail
GPUS=${GPUS:-4}
R=${RUNS:-/tmp/ft_sharded}
export NCCL_NVLS_ENABLE=0
RUN=(torchrun --standalone --nproc-per-node "$GPUS")
STEPS=(--task sft --data "$R/data.jsonl" --overwrite --ep "$GPUS" --activation-checkpointing --steps 6
       --seq-len 1024 --micro-batch 2 --log-interval 2 --warmup-steps 1 --no-progress --checkpoint-interval 0
       --eval-interval 100000)
mkdir -p "$R"
if [ -z "${TOK:-}" ]; then
    TOK="$R/tok"
    [ -f "$TOK/tokenizer.json" ] || python -m dsmoe train --preset tiny --steps 1 --out "$TOK" --overwrite --no-progress
fi
[ -f "$R/base/config.json" ] || \
    python docs/finetune_sharded_memory.py make-base "$TOK" "$R" --preset deepseek-v2-lite --dtype bf16 --device cuda

"${RUN[@]}" docs/finetune_sharded_memory.py measure "$R" --ep "$GPUS" --seq-len 1024 --lora-rank 16 2>&1 \
    | grep RESULT | sed "s|RESULT|RESULT build, LoRA r16 (bf16 base):|"
"${RUN[@]}" docs/finetune_sharded_memory.py measure "$R" --ep "$GPUS" --seq-len 1024 2>&1 \
    | grep RESULT | sed "s|RESULT|RESULT build, full fine-tuning (fp32):|"

steps() {  # $1: label, then the extra flags
    local label=$1; shift
    "${RUN[@]}" --no-python /usr/bin/time -f "RESULT $label: host peak RSS of a rank %M KB" \
        python -m dsmoe finetune "$R/base" "${STEPS[@]}" --out "$R/$label" "$@" 2>&1 | tee "$R/$label.log" \
        | grep -E "RESULT|^done" || true
    python -c "
import json; rows=[json.loads(l) for l in open('$R/$label/metrics.jsonl') if 'tokens_per_s' in l]
print('RESULT $label: tokens/s per log window', [round(r['tokens_per_s']) for r in rows],
      '| peak GPU GB (rank 0)', [r.get('peak_memory_gb') for r in rows])"
}
steps lora --lora-rank 16 --lora-targets attention experts
[ -n "${FULL:-}" ] && steps full --param-dtype bf16
exit 0
