"""Loading a model folder for generation: model + tokenizer on the chosen device, and the shared CLI flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.devices import DTYPES, add_device_argument, add_moe_impl_argument, resolve_device
from dsmoe.errors import UserError

log = logging.getLogger(__name__)

# drafts per step: one MTP module drafts well one token ahead; a looked-up continuation is often right for several
DEFAULT_DRAFTS = {"mtp": 1, "ngram": 4}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model folder: a dsmoe run folder or a Hugging Face DeepSeek checkpoint")
    add_device_argument(parser)
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto = bfloat16 on a GPU, float32 on the CPU")
    add_moe_impl_argument(parser)
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on a GPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (faster decode; each batch/length bucket compiles once)")
    add_quantize_argument(parser)
    parser.add_argument("--speculative", choices=["mtp", "ngram"], default=None,
                        help="speculative decoding, the model verifies drafts: mtp = its MTP module drafts (needs "
                             "num_nextn_predict_layers >= 1), ngram = prompt lookup, the tokens that followed the "
                             "last n tokens where they occurred before (any model; pays when output copies input). "
                             "No logprobs or repetition penalty")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="drafts per step with --speculative (default: 1 for mtp, 4 for ngram)")
    parser.add_argument("--prompt-lookup-min", type=int, default=2, help="shortest n-gram --speculative ngram matches")
    parser.add_argument("--prompt-lookup-max", type=int, default=4, help="longest n-gram --speculative ngram matches")


def check_at_least_one(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Numeric flags that must be >= 1, checked before a model loads; an optional flag left unset (None) keeps
    its default."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 1:  # `not >=` also refuses nan
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["fp8", "int8"], default=None,
                        help="weight-only low precision: fp8 (e4m3, 128x128 block scales; a V3 FP8 checkpoint keeps "
                             "its own) or int8 (per output channel); weights only, activations keep their dtype")


def speculative_options(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments of the --speculative flags."""
    n = args.num_speculative_tokens
    if n is None:
        n = DEFAULT_DRAFTS.get(args.speculative, 1)
    return {"speculative": args.speculative, "num_speculative_tokens": n,
            "prompt_lookup": (args.prompt_lookup_min, args.prompt_lookup_max)}


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens generated at most")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: 1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="fixes the sampled tokens")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def load_for_inference(args: argparse.Namespace, classifier_ok: bool = False):
    """-> (model in eval mode, tokenizer, device) from the flags of add_model_arguments. A classifier folder is
    refused unless `classifier_ok` (dsmoe eval --task): generating needs a language model head."""
    from dsmoe.checkpoint.hf import load_pretrained

    device = resolve_device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = Tokenizer.load(args.path)  # first: a missing tokenizer fails before a long weight load
    if not classifier_ok:
        _refuse_classifier(Path(args.path))
    model = load_pretrained(args.path, dtype=dtype, device=device, moe_impl=args.moe_impl,
                            quantize=args.quantize).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{args.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}; the tokenizer belongs to another model")
    log.debug("loaded %s on %s in %s", args.path, device, dtype)
    return model, tokenizer, device


def _refuse_classifier(path: Path) -> None:
    """Before the weight load: a server started on a classifier folder answered every request with an error."""
    from dsmoe.checkpoint.hub_files import read_config_json
    from dsmoe.model.classifier import NOT_A_LANGUAGE_MODEL, classifier_labels

    if (path / "config.json").is_file() and classifier_labels(read_config_json(path)) is not None:
        raise UserError(f"{path}: {NOT_A_LANGUAGE_MODEL}")


def eos_ids(model, tokenizer: Tokenizer) -> tuple[int, ...]:
    ids = [*tokenizer.eos_ids, model.config.eos_token_id]
    return tuple(dict.fromkeys(i for i in ids if i is not None))
