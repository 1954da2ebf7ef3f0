"""Host memory of `dsmoe finetune` building its model from a base: one process (BASE loaded whole) against each
rank under torchrun (each reads only its own shards). Builds the FinetuneTrainer as `dsmoe finetune` does (the
CLI's own argument parsing and runtime) and prints, per process, the parameter bytes it holds and how much its
anonymous memory (the tensors) and its peak RSS (memory-mapped checkpoint pages included) grew over the build.

  python docs/finetune_sharded_memory.py make-base runs/tiny /tmp/mem       # random 137M-parameter fp32 base
  python docs/finetune_sharded_memory.py measure /tmp/mem                   # one process
  torchrun --standalone --nproc-per-node 2 docs/finetune_sharded_memory.py measure /tmp/mem   # 2 ranks (gloo)
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


def memory_mb() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmHWM", "RssAnon")}


def make_base(tokenizer_folder: str, out: Path) -> None:
    from dsmoe import get_preset, save_pretrained
    from dsmoe.data.tokenizer import load_tokenizer
    from dsmoe.model.transformer import build_model

    config = get_preset("tiny").replace(
        vocab_size=load_tokenizer(Path(tokenizer_folder)).vocab_size, hidden_size=512, intermediate_size=1024,
        moe_intermediate_size=512, num_hidden_layers=6, first_k_dense_replace=1, n_routed_experts=32,
        num_experts_per_tok=4, n_group=4, topk_group=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = build_model(config, dtype=torch.float32)
    save_pretrained(model, out / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_folder) / name, out / "base")
    rows = (json.dumps({"prompt": f"say {i}", "completion": f" {i}!"}) for i in range(64))
    (out / "data.jsonl").write_text("\n".join(rows) + "\n")
    print(f"{out / 'base'}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9:.2f} GB")


def measure(folder: Path) -> None:
    from dsmoe.finetune.cli import add_arguments, resolve
    from dsmoe.finetune.trainer import FinetuneTrainer
    from dsmoe.train.cli import start_runtime

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(folder / "base"), "--task", "sft", "--data", str(folder / "data.jsonl"),
                              "--lora-rank", "2", "--seq-len", "32", "--no-progress", "--overwrite",
                              "--out", str(folder / "run")])
    cfg, ft, out, _ = resolve(args)
    rt = start_runtime(args, cfg.device, "finetune")
    distributed = rt is not None and rt.world_size > 1
    before = memory_mb()
    trainer = FinetuneTrainer(cfg, ft, out, reducer=rt if distributed else None, progress=False, overwrite=True)
    after = memory_mb()
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    who = f"rank {rt.rank} of {rt.world_size}" if distributed else "one process"
    print(f"{who}: holds {held / 1e6:.0f} of {total / 1e6:.0f} MB of parameters; over the build anonymous memory "
          f"+{after['RssAnon'] - before['RssAnon']} MB, peak RSS +{after['VmHWM'] - before['VmHWM']} MB", flush=True)
    if rt is not None:
        rt.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["make-base"]:
        make_base(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1:2] == ["measure"]:
        measure(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
