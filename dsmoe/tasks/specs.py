"""Task specs: what `dsmoe eval --task NAME` asks of a model, declared as data (prompt template, answer
field, metric), plus reading a task's JSONL examples and drawing few-shot examples.

A spec's `kind` says how the model is queried: "classification" scores each label's verbaliser as a
continuation of the prompt (or runs the folder's classification head), "generation" generates greedily
until a stop string, "chat" scores the assistant turns of a conversation. Built-in specs cover the datasets
in ../shared/data (README there); `--task spec.json` reads a user's spec with the same fields.
"""

from __future__ import annotations

import dataclasses
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

from dsmoe.data.sources import jsonl_records
from dsmoe.errors import UserError
from dsmoe.json_files import read_json

KINDS = ("classification", "generation", "chat")
METRICS = {  # metric -> the kind of task it scores
    "classification": "classification",  # accuracy, macro-F1, confusion matrix
    "squad": "generation",  # exact match and token F1 after SQuAD's answer normalisation
    "translation": "generation",  # sacrebleu BLEU and chrF
    "rouge": "generation",  # rouge-score ROUGE-1/2/L F-measure
    "chat_loss": "chat",  # loss and perplexity over assistant tokens
}


TEMPLATE_HELP = "templates are Python format strings such as '{question}' ('{{' for a literal brace)"


def template_fields(template: str, what: str) -> list[str]:
    """The field names a template reads, in order; a malformed template is one clear error naming `what`."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise UserError(f"{what}: the template {template!r} is malformed ({e}); {TEMPLATE_HELP}") from None


def fill_template(template: str, fields: dict, what: str) -> str:
    try:
        return template.format(**fields)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise UserError(f"{what}: cannot fill the template {template!r} ({type(e).__name__}: {e}); "
                        f"{TEMPLATE_HELP}") from None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    metric: str
    answer: str  # field with the gold answer: a label, an answer string, a reference, or the message list
    prompt: str = ""  # str.format template over the example's fields
    labels: tuple[str, ...] = ()  # classification: the label values, in the order of the confusion matrix
    verbalizers: dict[str, str] = field(default_factory=dict)  # label -> text scored after the prompt
    references: str | None = None  # generation: field holding a list of references (default: [answer])
    group_by: str | None = None  # template whose value splits the metric (e.g. per translation direction)
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    shot_separator: str = "\n\n"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"task {self.name!r}: unknown kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise UserError(f"task {self.name!r}: unknown metric {self.metric!r}; known metrics: "
                            f"{', '.join(METRICS)}")
        if METRICS[self.metric] != self.kind:
            raise UserError(f"task {self.name!r}: metric {self.metric!r} scores {METRICS[self.metric]} tasks, "
                            f"not {self.kind}")
        if self.kind == "classification" and not self.labels:
            raise UserError(f"task {self.name!r}: a classification task needs its labels")
        missing = [label for label in self.labels if label not in self.verbalizers]
        if self.kind == "classification" and missing:
            raise UserError(f"task {self.name!r}: no verbalizer for label(s) {', '.join(missing)}")
        self.fields()  # a malformed template fails when the spec is read, not at its first example

    def prompt_fields(self) -> list[str]:
        """The example fields the prompt template reads, in order."""
        return list(dict.fromkeys(template_fields(self.prompt, f"task {self.name!r} prompt")))

    def fields(self) -> list[str]:
        """The fields every example must have."""
        names = set(self.prompt_fields()) | set(template_fields(self.group_by or "", f"task {self.name!r} group_by"))
        return sorted(names | {self.answer} | ({self.references} if self.references else set()))

    def render(self, example: dict) -> str:
        return fill_template(self.prompt, example, f"task {self.name!r} prompt")

    def target_text(self, example: dict) -> str:
        """The text that follows the prompt in a few-shot example."""
        answer = example[self.answer]
        return self.verbalizers[answer] if self.kind == "classification" else " " + str(answer)

    def group(self, example: dict) -> str | None:
        return fill_template(self.group_by, example, f"task {self.name!r} group_by") if self.group_by else None


def _classifier(name: str, prompt: str, labels: list[str]) -> TaskSpec:
    return TaskSpec(name, "classification", "classification", answer="label", prompt=prompt, labels=tuple(labels),
                    verbalizers={label: " " + label for label in labels})


DBPEDIA_LABELS = ["Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                  "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"]
BUILTIN: dict[str, TaskSpec] = {spec.name: spec for spec in [
    _classifier("rt_polarity", "Review: {text}\nSentiment:", ["negative", "positive"]),
    _classifier("dbpedia14", "Text: {text}\nTopic:", DBPEDIA_LABELS),
    _classifier("sms_spam", "Message: {text}\nSpam or ham:", ["ham", "spam"]),
    TaskSpec("xquad_en", "generation", "squad", answer="answer",
             prompt="Context: {context}\nQuestion: {question}\nAnswer:", max_new_tokens=32),
    TaskSpec("ntrex128", "generation", "translation", answer="target", group_by="{source_lang}-{target_lang}",
             prompt="Translate from {source_lang} to {target_lang}.\n{source_lang}: {source}\n{target_lang}:",
             max_new_tokens=128),
    TaskSpec("scitldr", "generation", "rouge", answer="summary", references="summaries",
             prompt="{document}\nTL;DR:", max_new_tokens=64),
    TaskSpec("oasst1_en", "chat", "chat_loss", answer="messages"),
]}


def get_task(name: str) -> TaskSpec:
    """A built-in task by name, or a spec read from a .json file with TaskSpec's fields."""
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        data = read_json(path, "a task spec is one JSON object of TaskSpec's fields")
        known = {f.name for f in dataclasses.fields(TaskSpec)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown field(s) {', '.join(unknown)}; "
                            f"a task spec has {', '.join(sorted(known))}")
        for key in ("labels", "stop"):
            if key in data:
                data[key] = tuple(data[key])
        data.setdefault("name", path.stem)
        try:
            return TaskSpec(**data)
        except TypeError as e:
            raise UserError(f"{path}: {e}") from None
    raise UserError(f"unknown task {name!r}; known tasks: {', '.join(BUILTIN)} (or a task spec .json file)")


def read_examples(path: str | Path, spec: TaskSpec, limit: int | None = None) -> list[dict]:
    """The JSONL examples of a task; a line that is not a JSON object, lacks a field or has a label outside
    the task's labels is named with its line number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file: pass a .jsonl file with one example per line")
    needed = spec.fields()
    examples = []
    with path.open(encoding="utf-8", errors="replace") as f:  # undecodable bytes show as U+FFFD, not a crash
        for number, example in jsonl_records(path, f):
            if not isinstance(example, dict):
                raise UserError(f"{path}:{number}: expected a JSON object with fields {', '.join(needed)}")
            missing = [name for name in needed if name not in example]
            if missing:
                raise UserError(f"{path}:{number}: missing field(s) {', '.join(missing)} (task {spec.name} reads "
                                f"{', '.join(needed)})")
            if spec.kind == "classification" and example[spec.answer] not in spec.labels:
                raise UserError(f"{path}:{number}: label {example[spec.answer]!r} is not one of task {spec.name}'s "
                                f"labels ({', '.join(spec.labels)})")
            if spec.references:
                refs = example[spec.references]
                refs = [refs] if isinstance(refs, str) else refs  # one reference given alone
                if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
                    raise UserError(f"{path}:{number}: {spec.references} must be a reference text or a non-empty "
                                    f"list of them, got {str(example[spec.references])[:80]!r}")
                example = {**example, spec.references: refs}
            examples.append(example)
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def few_shot_prefix(spec: TaskSpec, shots: list[dict]) -> str:
    return "".join(spec.render(ex) + spec.target_text(ex) + spec.shot_separator for ex in shots)


def draw_shots(pool: list[dict], k: int, seed: int = 1234) -> list[dict]:
    """The same k examples for every run (fixed seed), the same for every test example."""
    if k > len(pool):
        raise UserError(f"--shots {k} but the --shots-from file has only {len(pool)} examples")
    return random.Random(seed).sample(pool, k)
