"""Fine-tuning: SFT loss masking, classification heads, LoRA (dense and per-expert), merge (`dsmoe finetune`)."""
