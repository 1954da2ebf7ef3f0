"""Fine-tuning data: JSONL records -> token ids (+ SFT loss mask or class index) -> packed or padded micro-batches.

Records:
  sft       {"messages": [{"role", "content"}, ...]} rendered with the base's chat template (the sandboxed
            renderer of `dsmoe chat`), or {"prompt", "completion"}; the loss covers assistant / completion
            tokens only (labels -100 elsewhere).
  classify  {"text", "label"}; the label set is the sorted labels of the training file.
`--field-map` renames or builds these fields from other ones: KEY=FIELD or KEY=TEMPLATE ("{question}" style
str.format over the record), or a preset name (qa, translation, summarization) for the shared data files.

Batches. sft: packed. Each epoch's examples (a fresh permutation) are packed, first fit by decreasing length
within chunks of that order, into rows of --seq-len positions, as pretraining fills its rows; positions restart at
0 in every example and attention stays inside it (model/packed_attention.py), so each example's
logits are those of a forward of that example alone, with no compute spent on padding (a micro-batch of short
padded examples likely kept a GPU waiting on the host). classify: padded, one example per row (the head reads each
row's last real token), right-padded to the longest of its micro-batch rounded up to a multiple of 64 (see
padded_width), after sorting each step's examples by length. The order is a pure function of (seed, step):
resume is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsmoe.errors import UserError
from dsmoe.infer.chat_template import render_chat
from dsmoe.model.classifier import classifier_input
from dsmoe.model.packed_attention import PackedLayout
from dsmoe.tasks.specs import BUILTIN, fill_template, template_fields
from dsmoe.train.loss import Batch

IGNORE = -100
# The shared QA / translation / summarisation files as instruction data, with the prompts `dsmoe eval --task`
# scores them with (dsmoe.tasks.specs), so a fine-tune learns the format it is evaluated in.
FIELD_MAP_PRESETS = {
    preset: {"prompt": BUILTIN[task].prompt, "completion": " {%s}" % BUILTIN[task].answer}
    for preset, task in (("qa", "xquad_en"), ("translation", "ntrex128"), ("summarization", "scitldr"))}


class DataError(UserError):
    """A record that cannot be used; the message names the file and line."""


def parse_field_map(items: list[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items or []:
        if item in FIELD_MAP_PRESETS:
            mapping.update(FIELD_MAP_PRESETS[item])
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--field-map {item!r}: use KEY=FIELD, KEY=TEMPLATE or one of "
                            f"{', '.join(FIELD_MAP_PRESETS)}")
        template_fields(value, f"--field-map {item!r}")  # malformed: an error now, not at the first record
        mapping[key] = value
    return mapping


def _apply_map(record: dict, mapping: dict[str, str], where: str) -> dict:
    out = dict(record)
    for key, value in mapping.items():
        names = template_fields(value, f"--field-map {key}={value}")
        missing = [n for n in (names or [value]) if n not in record]
        if missing:
            raise DataError(f"{where}: no field {missing[0]!r} for --field-map {key}={value}; the record has "
                            f"{', '.join(sorted(record)) or 'no fields'}")
        out[key] = fill_template(value, record, f"{where}: --field-map {key}") if names else record[value]
    return out


def read_jsonl(path: str | Path, mapping: dict[str, str]) -> list[tuple[str, dict]]:
    """[(where, record)], where = "FILE:LINE"; a malformed line is an error naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no data file {path}: pass a .jsonl file")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as "
                                "UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: a JSON object is needed, got {type(record).__name__}")
            records.append((where, _apply_map(record, mapping, where)))
    if not records:
        raise UserError(f"{path} holds no records")
    return records


@dataclass
class Example:
    ids: list[int]
    labels: list[int] | int  # per-token targets (sft) or a class index (classify)


class SFTEncoder:
    """Text segments, each encoded on its own, the assistant / completion ones counted by the loss."""

    def __init__(self, tokenizer, chat_template: str | None, seq_len: int):
        self.tok, self.template, self.max_len = tokenizer, chat_template, seq_len + 1

    def segments(self, record: dict, where: str) -> list[tuple[str, bool]]:
        if "messages" in record:
            return self._chat_segments(record["messages"], where)
        if "prompt" in record and "completion" in record:
            return [(str(record["prompt"]), False), (str(record["completion"]), True)]
        raise DataError(f"{where}: an SFT record needs \"messages\" or \"prompt\" and \"completion\" (or a "
                        f"--field-map that builds them); it has {', '.join(sorted(record))}")

    def _chat_segments(self, messages, where: str) -> list[tuple[str, bool]]:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects whose "
                            "role and content are text")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one or "
                            "drop the record")
        render = lambda msgs, gen: render_chat(msgs, self.template, bos_token="", eos_token=self.eos,
                                               add_generation_prompt=gen)
        segments, done = [], ""
        for i in turns:
            prefix, full = render(messages[:i], True), render(messages[:i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(f"{where}: the chat template does not render this conversation turn by turn (a "
                                "later render changes an earlier one), so the assistant tokens cannot be found")
            segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        return segments

    @property
    def eos(self) -> str:
        return self.tok.eos_token

    def encode(self, record: dict, where: str) -> Example | None:
        ids, labels = [self.tok.bos_id], [IGNORE]
        for text, learn in self.segments(record, where):
            piece = self.tok.encode(text, add_special_tokens=False) if text else []
            if learn and "messages" not in record:
                piece = piece + [self.tok.eos_id]  # a completion ends the sequence
            ids += piece
            labels += piece if learn else [IGNORE] * len(piece)
        overflow = len(ids) - self.max_len
        if overflow > 0:  # the prompt's start goes first (as task evaluation cuts prompts), so the answer stays
            first_target = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
            cut = min(overflow, max(first_target - 1, 0))
            ids, labels = ids[:1] + ids[1 + cut:], labels[:1] + labels[1 + cut:]  # BOS stays
        ids, labels = ids[:self.max_len], labels[:self.max_len]
        return Example(ids, labels) if any(t != IGNORE for t in labels[1:]) else None


def encode_sft(records, tokenizer, chat_template: str | None, seq_len: int) -> tuple[list[Example], int]:
    """-> (examples, number dropped because truncation to seq_len left no target token). A long example loses
    its prompt's start, then, if its targets alone are too long, their end."""
    encoder = SFTEncoder(tokenizer, chat_template, seq_len)
    encoded = [encoder.encode(r, where) for where, r in records]
    return [e for e in encoded if e is not None], sum(e is None for e in encoded)


def label_set(records) -> list[str]:
    for where, r in records:
        if "text" not in r or "label" not in r:
            raise DataError(f"{where}: a classification record needs \"text\" and \"label\" (or a --field-map "
                            f"that builds them); it has {', '.join(sorted(r))}")
    return sorted({str(r["label"]) for _, r in records})


def encode_classify(records, tokenizer, labels: list[str], seq_len: int) -> list[Example]:
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for where, r in records:
        label = str(r.get("label"))
        if label not in index:
            raise DataError(f"{where}: label {label!r} is not in the label set of the training data "
                            f"({', '.join(labels)}); fix the label or add training examples for it")
        out.append(Example(classifier_input(tokenizer, r["text"], seq_len), index[label]))
    return out


def step_examples(n: int, seed: int, step: int, per_step: int) -> np.ndarray:
    """Indices of one step's examples: consecutive slices of a fresh permutation per epoch."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(perms[epoch][pos])
    return np.asarray(out)


@dataclass
class ExampleBatch:
    """Classification examples: right-padded ids (B, L), the real length of each row and one class index per row."""
    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> ExampleBatch:
        return ExampleBatch(*(t.to(device, non_blocking=True) for t in (self.ids, self.lengths, self.labels)))


PAD_MULTIPLE = 64


def padded_width(longest: int, cap: int) -> int:
    """A micro-batch's width: its longest example rounded up to a multiple of 64, at most `cap` (the longest
    example of the data set, so never past --seq-len). Few distinct widths mean few compiled graphs, cuDNN
    attention plans and autotuned kernel shapes; the extra pads cost nothing to the loss (IGNORE labels)."""
    return min(cap, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(examples: list[Example], pad_id: int, cap: int | None = None) -> ExampleBatch:
    length = max(len(e.ids) for e in examples)
    length = padded_width(length, cap) if cap else length
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
    lengths = torch.tensor([len(e.ids) for e in examples])
    return ExampleBatch(ids, lengths, torch.tensor([e.labels for e in examples]))


class ExampleSource:
    """The trainer's batch source for classify: each step's examples sorted by length, then cut into micro-batches."""

    def __init__(self, examples: list[Example], seed: int, pad_id: int):
        self.examples, self.seed, self.pad_id = examples, seed, pad_id
        self.cap = max((len(e.ids) for e in examples), default=0)

    def batches(self, step: int, *, micro_batch: int, grad_accum: int, dp_rank: int = 0,
                dp_size: int = 1) -> list[ExampleBatch]:
        per_rank = micro_batch * grad_accum
        chosen = step_examples(len(self.examples), self.seed, step, per_rank * dp_size)
        mine = sorted((self.examples[i] for i in chosen[dp_rank * per_rank:(dp_rank + 1) * per_rank]),
                      key=lambda e: len(e.ids))
        return [collate(mine[i:i + micro_batch], self.pad_id, self.cap) for i in range(0, per_rank, micro_batch)]


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[tuple[list[int], ExampleBatch]]:
    """(indices into examples, batch) in order of length."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    cap = max((len(e.ids) for e in examples), default=0)
    return [(order[j:j + batch_size], collate([examples[i] for i in order[j:j + batch_size]], pad_id, cap))
            for j in range(0, len(order), batch_size)]


# ---- packing (sft) -----------------------------------------------------------------------------------------

PACK_CHUNK = 4096  # examples packed together: bounds the first-fit search, keeps an epoch's order mostly random


def pack(sizes: np.ndarray, width: int) -> list[list[int]]:
    """First fit by decreasing size: indices into `sizes` grouped into rows whose sizes sum to <= width."""
    free = np.empty(len(sizes), dtype=np.int64)
    rows: list[list[int]] = []
    for i in np.argsort(-sizes, kind="stable"):
        fits = free[:len(rows)] >= sizes[i]
        r = int(fits.argmax()) if len(rows) and fits.any() else len(rows)
        if r == len(rows):
            rows.append([])
            free[r] = width
        rows[r].append(int(i))
        free[r] -= sizes[i]
    return rows


def positions_of(example: Example) -> int:
    """Positions an SFT example fills in a packed row: its tokens but the last (which is only a target)."""
    return len(example.ids) - 1


def packed_batch(rows: list[list[Example]], pad_id: int, width: int) -> Batch:
    """Rows of whole examples -> a Batch with positions and segment ids (one per example; -1 on the padded tail),
    as wide as its fullest row rounded up to a multiple of 64 (at most `width`)."""
    fill = max(sum(positions_of(e) for e in row) for row in rows)
    B, S = len(rows), padded_width(fill, width)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    segments = torch.full((B, S), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row):
            n = positions_of(e)
            ids[b, at:at + n] = torch.tensor(e.ids[:-1])
            labels[b, at:at + n] = torch.tensor(e.labels[1:])
            positions[b, at:at + n] = torch.arange(n)
            segments[b, at:at + n] = j
            at += n
    return Batch(ids, labels, segments >= 0, positions, PackedLayout.from_segment_ids(segments))


class PackedSource:
    """The trainer's batch source for sft: epoch after epoch of packed rows (a pure function of the seed), step s
    taking the next micro_batch x grad_accum rows of every rank."""

    def __init__(self, examples: list[Example], seed: int, pad_id: int, width: int):
        self.examples, self.seed, self.pad_id, self.width = examples, seed, pad_id, width
        self.sizes = np.array([positions_of(e) for e in examples], dtype=np.int64)
        self.rows_per_epoch: list[int] = []
        self.plans: dict[int, list[list[int]]] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self.plans:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples))
            rows = []
            for start in range(0, len(order), PACK_CHUNK):
                chunk = order[start:start + PACK_CHUNK]
                packed = [[int(chunk[i]) for i in row] for row in pack(self.sizes[chunk], self.width)]
                rows += [packed[i] for i in rng.permutation(len(packed))]
            self.plans = {e: p for e, p in self.plans.items() if e == epoch - 1}  # a step may span two epochs
            self.plans[epoch] = rows
        return self.plans[epoch]

    def _rows(self, first: int, count: int) -> list[list[int]]:
        epoch = 0
        while True:
            if epoch == len(self.rows_per_epoch):
                self.rows_per_epoch.append(len(self._plan(epoch)))
            if first < self.rows_per_epoch[epoch]:
                break
            first -= self.rows_per_epoch[epoch]
            epoch += 1
        rows = []
        while len(rows) < count:
            plan = self._plan(epoch)
            rows += plan[first:first + count - len(rows)]
            epoch, first = epoch + 1, 0
        return rows

    def batches(self, step: int, *, micro_batch: int, grad_accum: int, dp_rank: int = 0,
                dp_size: int = 1) -> list[Batch]:
        per_rank = micro_batch * grad_accum
        rows = self._rows((step * dp_size + dp_rank) * per_rank, per_rank)
        return batches_of_rows(self.examples, rows, micro_batch, self.pad_id, self.width)


def batches_of_rows(examples: list[Example], rows: list[list[int]], rows_per_batch: int, pad_id: int,
                    width: int) -> list[Batch]:
    """Rows of example indices -> packed batches of `rows_per_batch` rows each."""
    return [packed_batch([[examples[i] for i in row] for row in rows[j:j + rows_per_batch]], pad_id, width)
            for j in range(0, len(rows), rows_per_batch)]


def packed_eval_batches(examples: list[Example], rows_per_batch: int, pad_id: int, width: int) -> list[Batch]:
    rows = pack(np.array([positions_of(e) for e in examples], dtype=np.int64), width)
    return batches_of_rows(examples, rows, rows_per_batch, pad_id, width)
