#!/usr/bin/env bash
# Issue 13 on one H200, about 8 minutes: (1) the small preset pretrained (compiled) for 2.5 minutes on English
# Wikipedia (CORPUS, else the built-in corpus), then SFT (compiled, examples packed into the same 8 x 1024 rows)
# on xquad_en and ntrex128 with the task metric (dsmoe eval --task) before and after, and fine-tuning vs
# pretraining tokens/s; (2) LoRA on the DeepSeek-V2-Lite shape (random bf16 weights, activation checkpointing):
# peak memory and tokens/s. SKIP_LORA=1 leaves (2) out.
# Data: the GPU machine has no ../shared; copy the four files into the ignored folder out/finetune_data first:
#   mkdir -p out/finetune_data && cp ../shared/data/{xquad_en,ntrex128}_{train,test}.jsonl out/finetune_data/
# and carry out/finetune_data. Read: the lines starting with "RESULT".
set -euo pipefail
D=${DATA:-out/finetune_data}
R=${RUNS:-/tmp/ft_gpu}
DSMOE="python -m dsmoe"
CORPUS=${CORPUS:-}
COMMON=(--seq-len 1024 --micro-batch 8 --compile --no-progress --checkpoint-interval 100000 --eval-interval 100000)
mkdir -p "$R"
summary() { grep -h -E "^(done|stopped|eval:)" "$1" | sed "s|^|RESULT $2: |"; }

# 1. pretraining throughput and a base for the fine-tunes
$DSMOE train --preset small --out "$R/small" --overwrite --steps 20000 --time-limit 150 --lr 1e-3 "${COMMON[@]}" \
    ${CORPUS:+--data "$CORPUS"} \
    | tee "$R/pretrain.log"
summary "$R/pretrain.log" "pretrain small"

for pair in "xquad_en qa" "ntrex128 translation"; do
    set -- $pair
    $DSMOE eval "$R/small" --task "$1" --data "$D/$1_test.jsonl" --limit 48 2>&1 | tail -3 | sed "s|^|RESULT $1 before: |" || true
    $DSMOE finetune "$R/small" --task sft --data "$D/$1_train.jsonl" --eval-data "$D/$1_test.jsonl" --field-map "$2" \
        --out "$R/$1" --overwrite --steps 2000 --time-limit 60 --lr 3e-4 --warmup-steps 10 "${COMMON[@]}" \
        | tee "$R/$1.log"
    summary "$R/$1.log" "$1 sft (full)"
    $DSMOE eval "$R/$1" --task "$1" --data "$D/$1_test.jsonl" --limit 48 2>&1 | tail -3 | sed "s|^|RESULT $1 after: |" || true
done

[ -n "${SKIP_LORA:-}" ] && exit 0
# 2. LoRA on the DeepSeek-V2-Lite shape: random bf16 weights written once as a hub checkpoint (31 GB)
python - "$R/v2lite" "$R/small" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from dsmoe.checkpoint.hf import save_pretrained
from dsmoe.presets import get_preset
from dsmoe.model.transformer import build_model
out, tok = Path(sys.argv[1]), Path(sys.argv[2])
if not (out / "config.json").is_file():
    torch.manual_seed(0)
    model = build_model(get_preset("deepseek-v2-lite").replace(bos_token_id=0, eos_token_id=1), "cuda", torch.bfloat16)
    save_pretrained(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, out / name)
EOF
$DSMOE finetune "$R/v2lite" --task sft --data "$D/xquad_en_train.jsonl" --field-map qa --out "$R/v2lite-lora" \
    --overwrite --lora-rank 16 --lora-targets attention experts --activation-checkpointing --steps 8 \
    --seq-len 1024 --micro-batch 4 --no-progress --checkpoint-interval 100000 --eval-interval 100000 \
    --log-interval 4 | tee "$R/v2lite-lora.log"
summary "$R/v2lite-lora.log" "v2-lite LoRA r16 (attention+experts, AC)"
python -c "
import json; rows=[json.loads(l) for l in open('$R/v2lite-lora/metrics.jsonl') if 'tokens_per_s' in l]
print('RESULT v2-lite LoRA tokens/s per log window:', [round(r['tokens_per_s']) for r in rows],
      '| peak GB:', [r.get('peak_memory_gb') for r in rows])"
echo "RESULT full fine-tuning of V2-Lite on one H200: 15.7e9 params x (4 fp32 master + 4 grad + 8 AdamW) = 251 GB > 141 GB: does not fit"
