"""`dsmoe experts prune | grow | upcycle`: change the experts of a model folder and write a new one.

Each command loads MODEL (any folder `load_pretrained` reads), measures routing on calibration text where it
needs to (`--data`), writes OUT atomically (a temporary sibling folder renamed into place) in the hub layout
with the tokenizer files and a `surgery.json` provenance record, and prints the calibration loss before and
after (for prune also after dropping as many random experts, the baseline usage-based pruning must beat).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from dsmoe.atomic import replace_folder
from dsmoe.devices import add_device_argument, resolve_device
from dsmoe.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    action = functools.partial(sub.add_parser, formatter_class=parser.formatter_class)  # help shows defaults
    prune = action("prune", help="remove the least-used (or least costly) routed experts of every MoE layer")
    grow = action("grow", help="add routed experts split from the busiest ones")
    up = action("upcycle", help="turn dense FFN layers into DeepSeekMoE layers (fine-grained segments)")
    for p in (prune, grow, up):
        p.add_argument("path", metavar="MODEL", help="model folder (dsmoe run folder or Hugging Face checkpoint)")
        p.add_argument("--out", required=True, help="folder to write the new model to")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                       help="calibration text (files, folders, globs, .jsonl)")
        p.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
        p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
        p.add_argument("--max-tokens", type=int, default=65536, help="calibration tokens to read at most")
        add_device_argument(p)
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the random choices: prune's random-experts comparison, grow's jitter, "
                            "upcycle's router")
    amount = prune.add_mutually_exclusive_group(required=True)
    amount.add_argument("--keep", type=int, help="routed experts to keep per layer")
    amount.add_argument("--drop-fraction", type=float, help="share of routed experts to remove per layer")
    prune.add_argument("--by", choices=["usage", "loss"], default="usage",
                       help="keep the experts that receive the most tokens (usage), or whose removal alone raises the "
                            "calibration loss most (loss: one pass per layer and expert; bound it with --max-tokens)")
    grow.add_argument("--add", type=int, required=True, help="routed experts to add per layer")
    grow.add_argument("--noise", type=float, default=1e-3, help="jitter of the copies, relative to weight std")
    up.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    up.add_argument("--top-k", type=int, required=True, help="routed experts per token")
    up.add_argument("--shared", type=int, default=1, help="shared experts per MoE layer")
    up.add_argument("--keep-dense", type=int, default=1, help="the first N layers stay dense")
    up.add_argument("--router-init", choices=["random", "zero"], default="random",
                    help="zero: every expert weighs 1 at step 0 (exact when --top-k equals --experts)")


def run(args: argparse.Namespace) -> int:
    from dsmoe.checkpoint.hf import load_pretrained

    source, out = Path(args.path), Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite or another --out")
    if args.data and args.seq_len < 1:
        raise UserError(f"--seq-len {args.seq_len}: a calibration window needs at least 1 token")
    if args.data and args.max_tokens < args.seq_len:
        raise UserError(f"--max-tokens {args.max_tokens} is below --seq-len {args.seq_len}: calibration reads "
                        "windows of --seq-len tokens; raise --max-tokens")
    if args.action == "grow" and not 0 <= args.noise < float("inf"):
        raise UserError("--noise is a non-negative jitter relative to each weight's std, e.g. 1e-3")
    device = resolve_device(args.device)
    model = load_pretrained(source, dtype=torch.float32, device=device).eval()
    if args.data and args.seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is beyond the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings}); lower --seq-len")
    windows = _calibration(args, source, model.config.vocab_size)
    if args.action in ("prune", "grow") and not model.moe_layers():
        raise UserError(f"{source} has no MoE layers to {args.action}; `dsmoe experts upcycle` makes some")
    if args.action == "prune" and windows is None:
        raise UserError("prune ranks experts by the tokens they receive or by what their removal costs on "
                        "calibration text: pass it with --data")
    counts, loss_before = _routing(model, windows) if windows is not None and model.moe_layers() else (None, None)
    result, record = _ACTIONS[args.action](args, model, windows, counts, loss_before)
    record.update(action=args.action, source=str(source), calibration=args.data, seed=args.seed,
                  calibration_windows=None if windows is None else {"count": len(windows), "seq_len": args.seq_len})
    if windows is not None:
        record["loss_before"] = loss_before if loss_before is not None else _loss(model, windows)
        record["loss_after"] = _loss(result, windows)
        kept_by = f" (kept by {record['by']})" if "by" in record else ""
        print(f"calibration loss: before {record['loss_before']:.4f} | after{kept_by} {record['loss_after']:.4f}"
              + (f" | random experts dropped instead {record['loss_random']:.4f}" if "loss_random" in record else ""))
    _write_folder(result, source, out, record, args.overwrite)
    print(f"wrote {out} ({result.config.n_routed_experts} routed experts per MoE layer, "
          f"{result.config.num_params() / 1e6:.1f}M parameters)")
    return 0


def _prune(args, model, windows, counts, loss_before):
    from dsmoe.surgery.experts import SurgeryError, prune_experts, select_highest, select_random

    c = model.config
    if args.drop_fraction is not None and not 0 <= args.drop_fraction < 1:  # NaN too
        raise SurgeryError("--drop-fraction is a share in [0, 1)")
    keep = args.keep if args.keep is not None else round(c.n_routed_experts * (1 - args.drop_fraction))
    # the random baseline first: it checks every constraint on `keep` before any costly scoring
    random = prune_experts(model, select_random(len(c.moe_layer_ids), c.n_routed_experts, keep, c.n_group, args.seed))
    record = {"kept_per_layer": keep, "removed_per_layer": c.n_routed_experts - keep, "by": args.by,
              "expert_tokens": counts.tolist(), "loss_random": _loss(random, windows)}
    scores = counts
    if args.by == "loss" and keep < c.n_routed_experts:
        scores = torch.from_numpy(_removal_cost(model, windows, loss_before))
        record["expert_removal_loss_rise"] = scores.tolist()
    kept = select_highest(scores, keep, c.n_group)
    record["kept_experts"] = [ids.tolist() for ids in kept]
    return prune_experts(model, kept), record


def _grow(args, model, windows, counts, loss_before):
    from dsmoe.surgery.experts import grow_experts

    if counts is None:  # no calibration text: the experts are split in id order
        counts = torch.zeros(len(model.config.moe_layer_ids), model.config.n_routed_experts, dtype=torch.long)
    grown = grow_experts(model, args.add, counts, noise=args.noise, seed=args.seed)
    return grown, {"added_per_layer": args.add, "noise": args.noise}


def _upcycle(args, model, windows, counts, loss_before):
    from dsmoe.surgery.upcycle import upcycle

    moe = upcycle(model, experts=args.experts, top_k=args.top_k, shared=args.shared, keep_dense=args.keep_dense,
                  router_init=args.router_init, seed=args.seed)
    return moe, {"experts": args.experts, "top_k": args.top_k, "shared": args.shared, "keep_dense": args.keep_dense,
                 "router_init": args.router_init}


_ACTIONS = {"prune": _prune, "grow": _grow, "upcycle": _upcycle}


def _autocast(device: torch.device):
    return torch.bfloat16 if device.type == "cuda" else None


def _routing(model, windows) -> tuple[torch.Tensor, float]:
    """(tokens each routed expert received [MoE layers, E], calibration loss): one pass of `dsmoe analyze`'s
    collector over the windows."""
    from dsmoe.analysis.collect import collect_routing

    device = next(model.parameters()).device
    totals = collect_routing(model, [windows], batch_size=8, device=device, autocast_dtype=_autocast(device),
                             drafts=len(model.mtp) > 0)  # the MTP modules' experts are chosen by their own use
    return torch.from_numpy(totals.counts_LE).long(), totals.domain_loss[0]


def _removal_cost(model, windows, baseline: float):
    from dsmoe.analysis.probes import single_expert_removal

    device = next(model.parameters()).device
    return single_expert_removal(model, windows, baseline=baseline, batch_size=8, device=device,
                                 autocast_dtype=_autocast(device), progress=True)


def _loss(model, windows) -> float:
    from dsmoe.tasks.perplexity import evaluate_loss

    device = next(model.parameters()).device
    return evaluate_loss(model, windows, batch_size=8, device=device, autocast_dtype=_autocast(device))[0]


def _calibration(args, source: Path, vocab_size: int):

    from dsmoe.data.batches import eval_windows
    from dsmoe.data.prepare import read_documents
    from dsmoe.data.tokenizer import load_tokenizer

    if not args.data:
        return None
    tokenizer = load_tokenizer(source)
    docs = read_documents(args.data, args.text_field)
    tokens = tokenizer.encode_stream([d.text for d in docs])
    windows = [w for w in eval_windows(tokens, args.seq_len, args.max_tokens) if len(w) == args.seq_len + 1]
    if not windows:
        raise UserError(f"the calibration text has fewer than {args.seq_len + 1} tokens; pass more or lower --seq-len")
    if max(int(w.max()) for w in windows) >= vocab_size:
        raise UserError(f"{source}'s tokenizer produces ids past the model's vocabulary: the folder is inconsistent")
    return windows


def _write_folder(model, source: Path, out: Path, record: dict, overwrite: bool) -> None:
    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.data.tokenizer import copy_tokenizer_files

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp)
        copy_tokenizer_files(source, tmp)
        (tmp / "surgery.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists() and not overwrite:
            raise UserError(f"{out} appeared while writing; pass --overwrite")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
