"""lm-evaluation-harness model `dsmoe`: a model folder scored in process, likelihoods batched by length
(dsmoe.tasks.scoring) and generation through the continuous-batching engine.

Importing this module registers the name with lm-eval's model registry. lm-eval 0.4.13 loads no plugins
(its registry accepts entry points, but nothing in it reads them), so `lm-eval run --model dsmoe` cannot
find this class on its own; `dsmoe eval MODEL --lm-eval TASKS` imports it and calls lm_eval.simple_evaluate,
and Python code can `import dsmoe.tasks.lm_eval_model` before calling simple_evaluate(model="dsmoe", ...).

Tokenization and windowing follow lm-eval's `hf` model (HFLM) so the two score the same requests on the same
tokens: tokenizer.json's own special tokens (add_bos_token=True adds BOS), BOS as the prefix of an empty
context, contexts left-truncated to max_length, rolling windows of max_length for loglikelihood_rolling.
"""

from __future__ import annotations

from collections import defaultdict

import lm_eval.models  # noqa: F401 (lm-eval fills its registry with its own models only while it is empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from dsmoe.errors import UserError
from dsmoe.tasks.scoring import ScoreRequest
from dsmoe.tasks.suite import TaskRun


@register_model("dsmoe")
class DsmoeLM(TemplateLM):
    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "auto", batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 moe_impl: str = "auto", cuda_graphs: bool = True, quantize: str | None = None, **_ignored):
        """_ignored: arguments lm-eval passes to every model (max_batch_size, ...) that have no meaning here."""
        super().__init__()
        import argparse

        from dsmoe.infer.loading import load_for_inference

        args = argparse.Namespace(path=str(pretrained), device=device, dtype=dtype, moe_impl=moe_impl,
                                  quantize=quantize)
        self.model, self.tokenizer, self._device = load_for_inference(args)
        self._batch_size = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() == "true"
        # one engine and one set of scoring graphs for every call lm-eval makes: captured once per process
        self.run = TaskRun(self.model, self.tokenizer, batch_size=self._batch_size,
                           cuda_graphs=str(cuda_graphs).lower() != "false")

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.token_id(self.tokenizer.eos_token)
        return eos if eos is not None else self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As transformers encodes for lm-eval's hf model: the special tokens of tokenizer.json's post-processor
        (a tokenizer_config.json add_bos_token is not applied, as transformers 5 does not apply it to a
        PreTrainedTokenizerFast); the model argument add_bos_token=True prepends BOS."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None:
            add_special_tokens = not (bos and string.startswith(bos))
        ids = self.tokenizer.backend.encode(string, add_special_tokens=add_special_tokens).ids
        bos_id = self.tokenizer.bos_id
        if add_special_tokens and self.add_bos_token and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---------------------------------------------------------------- likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1):]
            scored.append(ScoreRequest(ids, len(ids) - len(continuation)))
        results = self.run.score(scored)
        out = [(r.logprob, r.greedy) for r in results]
        for (cache_key, _, _), answer in zip(requests, out):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dsmoe.tasks.generation import generate_texts

        groups: dict[tuple, list[int]] = defaultdict(list)  # same stop strings and length: one engine run
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            groups[(tuple(until), max_new, temperature)].append(index)
        results: list[str | None] = [None] * len(requests)
        for (until, max_new, temperature), indices in groups.items():
            # contexts keep their last max_length - max_new tokens, as lm-eval's hf model does; the engine's
            # cache holds run.max_len tokens per sequence (at most 4096)
            keep = min(self.max_length, self.run.max_len) - max_new
            if keep < 1:
                raise UserError(f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length} tokens; "
                                "ask for fewer new tokens")
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
            texts = generate_texts(self.model, self.tokenizer, prompts, max_new_tokens=max_new, stop=list(until),
                                   temperature=temperature, engine=self.run.engine())
            for i, text in zip(indices, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results
