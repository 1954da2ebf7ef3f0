"""Running one task spec over its examples: classification (verbaliser likelihoods or the classifier head),
generation (greedy, through the continuous-batching engine) and chat loss. Each returns its metrics and one
prediction row per example; `dsmoe eval --task` (eval_tasks.py) reads and writes the files around it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from dsmoe.errors import UserError
from dsmoe.model.classifier import SequenceClassifier, classifier_input
from dsmoe.tasks import metrics
from dsmoe.tasks.scoring import continuation_request, score_requests
from dsmoe.tasks.specs import TaskSpec


SCORE_BATCH_TOKENS = 16384  # padded tokens of one scoring forward


@dataclass
class TaskRun:
    """What a task run needs besides its spec: the model, its tokenizer and how to batch."""
    model: torch.nn.Module
    tokenizer: object  # dsmoe.data.tokenizer.Tokenizer
    batch_size: int = 16  # sequences per forward / engine slots; 1 = one example at a time
    prefix: str = ""  # few-shot examples, rendered
    cuda_graphs: bool = True
    max_len: int = field(init=False)
    engines: dict = field(init=False, default_factory=dict)  # batch size -> Engine, kept across runs
    forward: object = field(init=False, default=None)  # HiddenStates: scoring forwards, graphs kept across runs

    def __post_init__(self):
        self.max_len = min(self.model.config.max_position_embeddings, 4096)

    def engine(self):
        """One engine per batch size, sized for max_len: its CUDA graphs are captured once, not per task run."""
        from dsmoe.tasks.generation import make_engine

        if self.batch_size not in self.engines:
            self.engines[self.batch_size] = make_engine(self.model, self.tokenizer, max_batch=self.batch_size,
                                                        max_model_len=self.max_len, cuda_graphs=self.cuda_graphs)
        return self.engines[self.batch_size]

    def score(self, requests):
        """score_requests through CUDA graphs per batch shape (on a GPU), captured once for every run."""
        from dsmoe.infer.graphs import HiddenStates

        if self.forward is None:
            self.forward = HiddenStates(self.model, self.batch_size, batch_tokens=SCORE_BATCH_TOKENS,
                                        cuda_graphs=self.cuda_graphs)
        return score_requests(self.model, requests, batch_size=self.batch_size, max_tokens=SCORE_BATCH_TOKENS,
                              hidden_states=self.forward)


def predict(spec: TaskSpec, examples: list[dict], run: TaskRun):
    """The model's part of a task (what `dsmoe bench tasks` times): classification -> (labels, per-example
    label scores), generation -> texts, chat -> per-conversation Scores."""
    if spec.kind == "classification":
        if isinstance(run.model, SequenceClassifier):
            return classify_with_head(spec, examples, run)
        return classify_by_likelihood(spec, examples, run)
    if isinstance(run.model, SequenceClassifier):
        raise UserError(f"task {spec.name} is a {spec.kind} task but the model folder is a sequence classifier; "
                        "pass a language model folder")
    if spec.kind == "generation":
        return generate_answers(spec, examples, run)
    return score_chats(spec, examples, run)


def score(spec: TaskSpec, examples: list[dict], predicted) -> tuple[dict, list[dict]]:
    """The metrics of a task from what `predict` returned."""
    if spec.kind == "classification":
        return _classification_result(spec, examples, *predicted)
    if spec.kind == "generation":
        return _generation_result(spec, examples, predicted)
    return _chat_result(predicted)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as lm-eval splits them: the whole text is encoded once (so a
    token may span the boundary as BPE merges it) and the continuation is what follows the context's tokens;
    trailing spaces of the context move to the continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    context_ids = tokenizer.encode(stripped)
    return context_ids, whole[len(context_ids):]


def _left_truncate(ids: list[int], room: int) -> list[int]:
    return ids[-room:] if len(ids) > room else ids


def _classification_result(spec: TaskSpec, examples, labels: list[str], scores) -> tuple[dict, list]:
    predicted = [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
    gold = [ex[spec.answer] for ex in examples]
    result = metrics.classification_metrics(gold, predicted, labels)
    rows = [{"index": i, "gold": g, "predicted": p, "correct": g == p, "scores": dict(zip(labels, s))}
            for i, (g, p, s) in enumerate(zip(gold, predicted, scores))]
    return result, rows


def classify_by_likelihood(spec: TaskSpec, examples: list[dict], run: TaskRun) -> tuple[list[str], list[list[float]]]:
    """Each label's verbaliser is scored as the continuation of the prompt; the most likely label wins."""
    labels = list(spec.labels)
    requests = []
    for ex in examples:
        context = run.prefix + spec.render(ex)
        for label in labels:
            ctx, cont = encode_pair(run.tokenizer, context, spec.verbalizers[label])
            requests.append(continuation_request(_left_truncate(ctx, run.max_len - len(cont)), cont))
    scores = run.score(requests)
    return labels, [[s.logprob for s in scores[i: i + len(labels)]] for i in range(0, len(scores), len(labels))]


def check_head_labels(spec: TaskSpec, head_labels: list[str]) -> None:
    if set(spec.labels) != set(head_labels):
        raise UserError(f"the classifier head's labels ({', '.join(head_labels)}, from config.json id2label) are "
                        f"not task {spec.name}'s labels ({', '.join(spec.labels)}): evaluate the head on the task "
                        "it was fine-tuned for, or fix id2label in config.json")


@torch.no_grad()
def classify_with_head(spec: TaskSpec, examples: list[dict], run: TaskRun) -> tuple[list[str], list[list[float]]]:
    """The fine-tuned head's argmax over its labels, batched by length like the likelihood requests. The head
    reads each example's "text" (else the one field the task's prompt names) as `dsmoe finetune --task classify`
    fed it, not the task's prompt template."""
    model: SequenceClassifier = run.model
    check_head_labels(spec, model.labels)
    if run.prefix:
        raise UserError("a classifier head reads the text alone, as it was fine-tuned: drop --shots")
    prompt_fields = spec.prompt_fields()
    field = "text" if all("text" in ex for ex in examples) or len(prompt_fields) != 1 else prompt_fields[0]
    if any(field not in ex for ex in examples):
        raise UserError(f"a classifier head reads each example's text alone, as `dsmoe finetune --task classify` "
                        f"did; task {spec.name}'s examples have no \"text\" field and its prompt names "
                        f"{len(prompt_fields)} fields: give the examples a \"text\" field")
    device = next(model.parameters()).device
    encoded = [classifier_input(run.tokenizer, ex[field], run.max_len) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    logits: list[list[float] | None] = [None] * len(encoded)
    for start in range(0, len(order), run.batch_size):
        batch = order[start: start + run.batch_size]
        lengths = torch.tensor([len(encoded[i]) for i in batch])
        ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[row]] = torch.tensor(encoded[i])
        out = model.classify(ids.to(device), lengths.to(device)).log_softmax(-1).cpu()
        for row, i in enumerate(batch):
            logits[i] = out[row].tolist()
    return model.labels, logits


def generate_answers(spec: TaskSpec, examples: list[dict], run: TaskRun) -> list[str]:
    from dsmoe.tasks.generation import generate_texts

    prompts = [_left_truncate(run.tokenizer.encode(run.prefix + spec.render(ex)), run.max_len - spec.max_new_tokens)
               for ex in examples]
    outputs = generate_texts(run.model, run.tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                             stop=list(spec.stop), engine=run.engine())
    return [text.strip() for text in outputs]


def _generation_result(spec: TaskSpec, examples: list[dict], predictions: list[str]) -> tuple[dict, list[dict]]:
    references = [list(ex[spec.references]) if spec.references else [str(ex[spec.answer])] for ex in examples]
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[spec.group(ex)].append(i)
    result = {}
    for group, indices in groups.items():
        scores = _generation_metrics(spec, [predictions[i] for i in indices], [references[i] for i in indices], group)
        if group is None:
            result.update(scores)
        else:
            result[group] = scores
    rows = [{"index": i, "prediction": p, "references": r} | ({"group": spec.group(ex)} if spec.group_by else {})
            for i, (ex, p, r) in enumerate(zip(examples, predictions, references))]
    return result, rows


def _generation_metrics(spec: TaskSpec, predictions: list[str], references: list[list[str]], group: str | None):
    if spec.metric == "squad":
        return metrics.squad_metrics(predictions, references)
    if spec.metric == "translation":
        target_lang = group.split("-", 1)[1] if group and "-" in group else None
        return metrics.translation_metrics(predictions, [refs[0] for refs in references], target_lang)
    return metrics.rouge_metrics(predictions, references)


def score_chats(spec: TaskSpec, examples: list[dict], run: TaskRun) -> list:
    from dsmoe.tasks.chat_loss import assistant_request

    requests = [assistant_request(run.tokenizer, ex[spec.answer], run.max_len) for ex in examples]
    scores = run.score([r for r in requests if r is not None])
    it = iter(scores)
    return [next(it) if r is not None else None for r in requests]


def _chat_result(per_example: list) -> tuple[dict, list[dict]]:
    total = sum(s.logprob for s in per_example if s)
    count = sum(s.tokens for s in per_example if s)
    result = metrics.chat_metrics(total, count)
    result["conversations_without_assistant_tokens"] = sum(s is None for s in per_example)
    rows = [{"index": i, "assistant_tokens": s.tokens if s else 0,
             "loss": -s.logprob / s.tokens if s and s.tokens else None} for i, s in enumerate(per_example)]
    return result, rows

