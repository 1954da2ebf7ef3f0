"""Memory of `dsmoe finetune` building its model from a base: one process (BASE loaded whole) against each rank
under torchrun (each reads only its own shards). Builds the FinetuneTrainer as `dsmoe finetune` does (the CLI's
own argument parsing and runtime) and prints, per process, the parameter bytes it holds, how much its anonymous
memory (the host tensors) and its peak RSS (memory-mapped checkpoint pages included) grew over the build, and on
GPUs the peak GPU memory allocated.

  python docs/finetune_sharded_memory.py make-base runs/tiny /tmp/mem       # random 137M-parameter fp32 base
  python docs/finetune_sharded_memory.py measure /tmp/mem                   # one process
  torchrun --standalone --nproc-per-node 2 docs/finetune_sharded_memory.py measure /tmp/mem   # 2 ranks (gloo)

make-base --preset deepseek-v2-lite --dtype bf16 --device cuda writes that shape (31 GB); measure passes any
further flags to `dsmoe finetune` (default: --lora-rank 2 --seq-len 256).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch


def memory_mb() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmHWM", "RssAnon")}


def make_base(tokenizer_folder: Path, out: Path, preset: str | None, dtype: str, device: str) -> None:
    from dsmoe import get_preset, save_pretrained
    from dsmoe.data.tokenizer import load_tokenizer
    from dsmoe.model.transformer import build_model

    tok = load_tokenizer(tokenizer_folder)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    config = get_preset(preset).replace(**ids) if preset else get_preset("tiny").replace(
        vocab_size=tok.vocab_size, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
        num_hidden_layers=6, first_k_dense_replace=1, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
        topk_group=2, num_attention_heads=4, **ids)
    torch.manual_seed(0)
    model = build_model(config, device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    save_pretrained(model, out / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, out / "base")
    rows = (json.dumps({"prompt": f"say {i} " * 40, "completion": f" {i}!"}) for i in range(256))
    (out / "data.jsonl").write_text("\n".join(rows) + "\n")
    print(f"{out / 'base'}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, "
          f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9:.2f} GB")


def measure(folder: Path, flags: list[str]) -> None:
    from dsmoe.finetune.cli import add_arguments, resolve
    from dsmoe.finetune.trainer import FinetuneTrainer
    from dsmoe.train.cli import start_runtime

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(folder / "base"), "--task", "sft", "--data", str(folder / "data.jsonl"),
                              "--no-progress", "--overwrite", "--out", str(folder / "run"),
                              *(flags or ["--lora-rank", "2", "--seq-len", "256"])])
    cfg, ft, out, _ = resolve(args)
    rt = start_runtime(args, cfg.device, "finetune")
    distributed = rt is not None and rt.world_size > 1
    before = memory_mb()
    trainer = FinetuneTrainer(cfg, ft, out, reducer=rt if distributed else None, progress=False, overwrite=True)
    after = memory_mb()
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if trainer.device.type == "cuda" else ""
    who = f"rank {rt.rank} of {rt.world_size}" if distributed else "one process"
    print(f"RESULT {who}: holds {held / 1e9:.2f} of {total / 1e9:.2f} GB of parameters; over the build anonymous "
          f"memory +{(after['RssAnon'] - before['RssAnon']) / 1e3:.2f} GB, peak RSS "
          f"+{(after['VmHWM'] - before['VmHWM']) / 1e3:.2f} GB{gpu}", flush=True)
    if rt is not None:
        rt.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-base")
    make.add_argument("tokenizer_folder", type=Path)
    make.add_argument("out", type=Path)
    make.add_argument("--preset")
    make.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    make.add_argument("--device", default="cpu")
    run = sub.add_parser("measure")
    run.add_argument("folder", type=Path)
    args, flags = parser.parse_known_args()
    if args.command == "make-base":
        make_base(args.tokenizer_folder, args.out, args.preset, args.dtype, args.device)
    else:
        measure(args.folder, flags)
