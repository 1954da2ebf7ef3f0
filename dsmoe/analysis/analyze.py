"""`dsmoe analyze MODEL --data FILE [FILE ...]`: what the experts of a model do on some text.

Each --data argument is one domain (a file, folder or glob). From each domain the first --tokens / domains tokens
are scored in windows of --seq-len, exactly as `dsmoe eval MODEL --data FILE --max-tokens N` scores them; that
pass also collects the routing statistics (dsmoe.analysis.collect). Then the probes (dsmoe.analysis.probes)
rescore the same windows with experts disabled. Writes into --out: report.json, report.md, load.png
(layer x expert), domains.png (domain x expert) and coactivation.png (expert x expert) of the most specialised
layer.

  dsmoe analyze runs/tiny --data a.txt b.jsonl --out runs/tiny/analysis
  dsmoe analyze /models/DeepSeek-V2-Lite --data wiki.jsonl code/ --tokens 65536 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dsmoe.devices import add_device_argument, add_moe_impl_argument
from dsmoe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a run folder or Hugging Face checkpoint folder")
    parser.add_argument("--data", nargs="+", action="extend", required=True, metavar="PATH",
                        help="one domain per argument: text files, folders, globs or .jsonl")
    parser.add_argument("--out", help="output folder (default: MODEL/analysis)")
    parser.add_argument("--text-field", default="text", help="field of each .jsonl record that holds the text")
    parser.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the one in MODEL)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens to score, split evenly over the domains")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--disable", type=int, nargs="*", default=None,
                        help="redundancy probe: numbers of routed experts to disable per layer (default: those of "
                             "1 2 4 that leave a token its experts; --disable with no numbers: skip the probe)")
    parser.add_argument("--random-draws", type=int, default=2, help="random expert sets per number in the probe")
    parser.add_argument("--top-tokens", type=int, default=8, help="characteristic tokens listed per expert")
    add_device_argument(parser)
    add_moe_impl_argument(parser)


def domain_windows(specs: list[str], tokenizer, text_field: str, seq_len: int, tokens: int) -> list[list[np.ndarray]]:
    from dsmoe.data.batches import eval_windows
    from dsmoe.data.prepare import read_documents

    per_domain = max(tokens // len(specs), 1)
    result = []
    for spec in specs:
        docs = read_documents([spec], text_field)
        ids, budget = [], per_domain + 1
        for start in range(0, len(docs), 64):  # tokenize only what the sample needs
            for doc_ids in tokenizer.encode_documents([d.text for d in docs[start:start + 64]]):
                ids.extend(doc_ids)
            if len(ids) >= budget + seq_len:
                break
        windows = eval_windows(np.asarray(ids), seq_len, per_domain)
        if not windows:
            raise UserError(f"--data {spec} has fewer than 2 tokens; pass more text")
        result.append(windows)
    return result


def analyze(model, tokenizer, specs: list[str], *, text_field: str = "text", tokens: int = 32768,
            seq_len: int = 512, batch_size: int = 8, disable: list[int] | None = None, random_draws: int = 2,
            top_tokens: int = 8, device=None, autocast_dtype=None, name: str = "model") -> tuple[dict, dict]:
    """-> (the JSON report, arrays for the figures)."""
    from dsmoe.analysis.collect import collect_routing
    from dsmoe.analysis.probes import redundancy_probe, shared_expert_ablation
    from dsmoe.analysis.report import coactivation_lift, layer_statistics, summary_numbers

    config = model.config
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if disable is None:
        disable = [n for n in (1, 2, 4) if n <= E - K] if E else []
    bad = [n for n in disable if not 0 < n <= E - K] if E else []
    if bad:
        raise UserError(f"--disable {bad[0]}: each layer has {E} routed experts and a token needs {K}; pass "
                        f"numbers from 1 to {E - K}")
    windows = domain_windows(specs, tokenizer, text_field, seq_len, tokens)
    if max(int(w.max()) for ws in windows for w in ws) >= config.vocab_size:
        raise UserError(f"the tokenizer's ids exceed the model's vocabulary ({config.vocab_size}): the tokenizer "
                        "belongs to another model; pass the right one with --tokenizer")
    eval_kw = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    start = time.perf_counter()
    totals = collect_routing(model, windows, **eval_kw)
    stats_s = time.perf_counter() - start
    n_tokens = sum(totals.domain_tokens)
    loss = sum(l * n for l, n in zip(totals.domain_loss, totals.domain_tokens)) / n_tokens
    main = config.main_moe_layer_ids  # the MTP modules' layers do not run here: no statistics of theirs
    layers = layer_statistics(totals, main, tokenizer, top_tokens)
    counts_LE = totals.counts_LE[:len(main)]  # the main model's layers come first
    figure_layer = int(np.argmax([l["domain_mi_bits"] for l in layers])) if len(specs) > 1 else len(layers) // 2
    all_windows = [w for ws in windows for w in ws]
    report = {
        "model": name, "tokens": n_tokens, "seq_len": seq_len, "loss": loss,
        "domains": [{"name": Path(spec).name or spec, "spec": spec, "loss": dl, "tokens": dn}
                    for spec, dl, dn in zip(specs, totals.domain_loss, totals.domain_tokens)],
        "experts": {"routed": E, "per_token": K, "shared": config.n_shared_experts},
        "summary": summary_numbers(layers), "figure_layer": figure_layer, "layers": layers,
        "redundancy": redundancy_probe(model, all_windows, counts_LE, list(disable), baseline=loss,
                                       random_draws=random_draws, **eval_kw) if disable else [],
        "shared_ablation": shared_expert_ablation(model, all_windows, baseline=loss, **eval_kw),
        "seconds": {"statistics_pass": round(stats_s, 2), "total": round(time.perf_counter() - start, 2)},
    }
    arrays = {"counts_LE": counts_LE,
              "coactivation_lift": coactivation_lift(totals.coactivation_LEE[figure_layer], totals.tokens)}
    return report, arrays


def write_outputs(report: dict, arrays: dict, layer_ids: list[int], out: Path) -> None:
    from dsmoe.analysis.figures import plot_coactivation, plot_domain_experts
    from dsmoe.analysis.report import markdown
    from dsmoe.atomic import atomic_write_text
    from dsmoe.train.plots import plot_expert_load

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    plot_expert_load(arrays["counts_LE"], layer_ids, out / "load.png",
                     f"expert load on {report['tokens']:,} tokens: {report['model']}")
    layer = report["layers"][report["figure_layer"]]
    plot_domain_experts(np.asarray(layer["domain_share"]), [d["name"] for d in report["domains"]], layer["layer"],
                        layer["domain_mi_bits"], out / "domains.png")
    plot_coactivation(arrays["coactivation_lift"], layer["layer"], out / "coactivation.png")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.data.tokenizer import load_tokenizer
    from dsmoe.devices import resolve_device

    path = Path(args.model)
    if args.tokens < 2 or args.seq_len < 1 or args.batch_size < 1 or args.random_draws < 1:
        raise UserError("--tokens must be at least 2 and --seq-len, --batch-size, --random-draws at least 1")
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    model = load_pretrained(path, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device,
                            moe_impl=args.moe_impl)
    if not model.moe_layers():
        raise UserError(f"{path} is a dense model: there are no experts to analyze")
    if args.seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is beyond the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings}); lower --seq-len")
    tokenizer = load_tokenizer(args.tokenizer or path)
    report, arrays = analyze(model, tokenizer, args.data, text_field=args.text_field, tokens=args.tokens,
                             seq_len=args.seq_len, batch_size=args.batch_size, disable=args.disable,
                             random_draws=args.random_draws, top_tokens=args.top_tokens, device=device,
                             autocast_dtype=torch.bfloat16 if on_gpu else None, name=path.name)
    out = Path(args.out) if args.out else path / "analysis"
    write_outputs(report, arrays, model.config.main_moe_layer_ids, out)
    print((out / "report.md").read_text(), end="")
    print(f"written: {out}/report.json, report.md, load.png, domains.png, coactivation.png")
    return 0
