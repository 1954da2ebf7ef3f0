"""What the trainer trains on: a `TrainingData` = a batch source (loss.py's seam), validation windows and the
vocabulary the model is built for. `pretraining_data` builds it from a corpus (--data, or the built-in one);
fine-tuning and benchmarks build their own and hand it to the Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dsmoe.data.batches import eval_windows, step_batches
from dsmoe.data.prepare import prepare_corpus
from dsmoe.data.shards import check_enough_tokens
from dsmoe.data.sources import Document
from dsmoe.train.config import TrainConfig
from dsmoe.train.loss import Batch, BatchSource

DATA_WAIT_S = 24 * 3600.0  # how long the other ranks wait for rank 0 to prepare the data


@dataclass
class TrainingData:
    train: BatchSource
    vocab_size: int
    bos_id: int
    eos_id: int
    description: str  # one line for the run's plan
    val_windows: list[np.ndarray] = field(default_factory=list)  # 1-D windows of seq_len + 1 tokens
    val_tokens_per_byte: float | None = None  # turns a loss per token into nats per byte
    tokenizer: object | None = None  # saved into the run folder (anything with .save(folder, max_length))


class TokenWindows:
    """Random windows of a token array (data/batches.py: a pure function of seed and step)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def batches(self, step: int, *, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int) -> list[Batch]:
        windows = step_batches(self.tokens, seq_len=self.seq_len, micro_batch=micro_batch, grad_accum=grad_accum,
                               seed=self.seed, step=step, dp_rank=dp_rank, dp_size=dp_size)
        return [Batch.from_windows(torch.from_numpy(w)) for w in windows]


def pretraining_data(cfg: TrainConfig, docs: list[Document], reducer, tokenizer_path: str | None,
                     cache_dir: Path | None, run_folder: Path | None) -> TrainingData:
    """The corpus (read_documents of cfg.data), tokenized once, prepared in waves under torchrun: rank 0 trains
    (or loads) the tokenizer, fills its node's token cache and saves the tokenizer into `run_folder`; then the first
    rank of every other node fills that node's cache with it; then the rest find everything cached. The waits have no
    collective timeout: a large corpus may take longer."""
    wave = 0 if reducer.is_main else 1 if reducer.local_rank == 0 else 2
    corpus = None
    for current in range(3 if reducer.world_size > 1 else 1):
        if wave == current:
            corpus = prepare_corpus(docs, val_fraction=cfg.val_fraction, vocab_size=cfg.vocab_size, cache_dir=cache_dir,
                                    tokenizer_path=tokenizer_path if wave == 0 else str(run_folder))
            if reducer.is_main and run_folder is not None:
                max_length = cfg.model_config(corpus.tokenizer.vocab_size, 0, 1).max_position_embeddings
                corpus.tokenizer.save(run_folder, max_length)
        reducer.barrier(timeout_s=DATA_WAIT_S)
    shards, tokenizer = corpus.shards, corpus.tokenizer
    check_enough_tokens(shards, cfg.seq_len)
    meta = shards.meta
    where = ", ".join(cfg.data) if cfg.data else "built-in corpus (Python standard library)"
    return TrainingData(
        train=TokenWindows(shards.train, cfg.seq_len, cfg.seed), vocab_size=tokenizer.vocab_size,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, tokenizer=tokenizer,
        val_windows=eval_windows(shards.val, cfg.seq_len, cfg.eval_tokens),
        val_tokens_per_byte=shards.val_tokens_per_byte,
        description=f"{where}: {len(docs)} documents, {meta['train_tokens']:,} train / {meta['val_tokens']:,} "
                    "validation tokens")


class RandomTokens:
    """Uniformly random token ids, a pure function of (seed, step): throughput benchmarks without a corpus. The
    global batch is drawn whole and each rank takes its slice, as TokenWindows does."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def batches(self, step: int, *, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int) -> list[Batch]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0]))
        ids = torch.randint(0, self.vocab_size, (dp_size, grad_accum, micro_batch, self.seq_len + 1), generator=g)
        return [Batch.from_windows(w) for w in ids[dp_rank]]


def random_data(vocab_size: int, seq_len: int, seed: int = 0) -> TrainingData:
    return TrainingData(train=RandomTokens(vocab_size, seq_len, seed), vocab_size=vocab_size, bos_id=0, eos_id=1,
                        description=f"random tokens (vocabulary {vocab_size}, seed {seed})")
