"""The training loop: data -> model -> loss -> guarded optimizer step -> aux-free bias update -> metrics,
evaluations, checkpoints and plots in the run folder.

One optimizer step = grad_accum micro-batches. After each micro-batch forward the trainer reads the
model's routing statistics (expert counts, balance loss); after the step it updates the aux-loss-free
router biases from the step's summed counts. A step whose loss or gradient norm is not finite is skipped
(no optimizer step, no bias update; its data is not retried) and counted; `max_skipped_steps` such steps
in a row abort the run. Every reduction across processes goes through `self.reducer` (reduce.py).

Under torchrun the reducer is the distributed runtime (dsmoe.distributed.runtime.Runtime) and the same loop runs
data parallel x expert parallel: every rank builds the same model from the seed, which parallelize() then shards
(EP, FSDP2, activation checkpointing, compile); each rank reads its own slice of every global batch; losses,
expert counts and evaluation sums are reduced over all ranks, and FSDP averages the gradients, so a step equals
one process's step over the same global batch. Rank 0 alone writes the run folder (config, tokenizer, metrics,
plots); checkpoints and the final export are collective (checkpoints.py, dsmoe.distributed.checkpoint).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dsmoe.checkpoint.hf import save_pretrained
from dsmoe.config import get_preset
from dsmoe.data.batches import eval_windows, step_batches
from dsmoe.data.prepare import prepare_corpus, read_documents
from dsmoe.data.shards import check_enough_tokens
from dsmoe.errors import UserError
from dsmoe.model.balance import max_violation
from dsmoe.model.mtp import mtp_loss
from dsmoe.tasks.perplexity import evaluate_loss, perplexity
from dsmoe.train import checkpoints
from dsmoe.train.config import TrainConfig
from dsmoe.train.flops import measure_dense_tflops, train_flops_per_token
from dsmoe.train.metrics import MetricsLog, require_tensorboard
from dsmoe.train.model_setup import build_training_model
from dsmoe.train.optim import build_optimizer, lr_at, set_lr
from dsmoe.train.reduce import SingleProcess
from dsmoe.train.run_folder import open_run_for_resume, start_run_folder

log = logging.getLogger(__name__)
DATA_WAIT_S = 24 * 3600.0  # how long the other ranks wait for rank 0 to prepare the data


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps."""


@functools.cache
def _plots():
    """The plotting module, or None (warned once) where matplotlib is missing: plots never stop a run."""
    try:
        from dsmoe.train import plots
    except ImportError as e:
        log.warning("no plots: %s (pip install matplotlib)", e)
        return None
    return plots


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 reducer=None, cache_dir: Path | None = None, progress: bool = True, sharded_init: bool = False):
        """reducer: None in one process, the dsmoe.distributed Runtime under torchrun. sharded_init (torchrun
        only): build the model on the meta device and initialise each rank's shards after sharding, for models
        that do not fit whole on one device (the weights then differ from a one-process run's)."""
        self.cfg, self.out = cfg, Path(out)
        self.reducer = reducer or SingleProcess()
        self.main = self.reducer.is_main
        self.distributed = self.reducer.world_size > 1
        self.progress = progress and self.main
        if cfg.tensorboard and self.main:
            require_tensorboard()
        self.device = resolve_device(cfg.device)
        if self.distributed:
            self.device = self.reducer.device  # this rank's GPU (LOCAL_RANK), or the CPU
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        cfg.model_config(get_preset(cfg.preset).vocab_size, 0, 1)  # bad overrides or seq_len fail before any work
        resume_from = open_run_for_resume(self.out, cfg) if resume else None
        # The global batch (sequences per optimizer step) is fixed when the run starts; resumed on another number
        # of ranks, each rank accumulates more or fewer micro-batches so that the steps stay the same.
        self.sequences_per_step = cfg.micro_batch * cfg.grad_accum * self.reducer.world_size
        if resume_from is not None:
            data = checkpoints.read_trainer_state(resume_from)["data"]
            self.sequences_per_step = data.get("sequences_per_step", cfg.micro_batch * cfg.grad_accum)
        self.grad_accum = checkpoints.micro_batches_per_rank(cfg.micro_batch, self.sequences_per_step,
                                                             self.reducer.world_size)
        docs = read_documents(cfg.data, cfg.text_field, cfg.corpus_limit_bytes())
        if not resume and self.main:
            start_run_folder(self.out, cfg, overwrite)

        # Data in waves: rank 0 trains (or loads) the tokenizer, fills its node's token cache and saves the tokenizer
        # into the run folder; then the first rank of every other node fills that node's cache with it; then the
        # rest find everything cached. The waits have no collective timeout: a large corpus may take longer.
        wave = 0 if self.main else 1 if self.reducer.local_rank == 0 else 2
        for current in range(3 if self.distributed else 1):
            if wave == current:
                self._prepare_data(docs, cfg.tokenizer if wave == 0 and not resume else str(self.out), cache_dir)
                if self.main:
                    self.tokenizer.save(self.out, self.model_config.max_position_embeddings)
            self.reducer.barrier(timeout_s=DATA_WAIT_S)

        self.model, self.forward = build_training_model(self.model_config, cfg, self.device, self.reducer,
                                                        self.grad_accum, sharded_init)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.total_steps = cfg.total_steps(self.sequences_per_step // (cfg.micro_batch * cfg.grad_accum))
        self.step = self.skipped = self.consecutive_skips = 0
        self.tokens_seen, self.elapsed_before = 0, 0.0
        if resume_from is not None:
            state = checkpoints.load(resume_from, self.model, self.optimizer, self.reducer)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.skipped, self.consecutive_skips = state["skipped_steps"], state["consecutive_skips"]
            self.elapsed_before = state["elapsed_s"]
        self.metrics = MetricsLog(self.out, resume_step=self.step if resume else None,
                                  tensorboard=cfg.tensorboard) if self.main else None
        moe = self.model.moe_layers()
        self.load_counts = np.zeros((len(moe), self.model_config.n_routed_experts or 0), dtype=np.int64)
        self.load_since = self.step
        self.flops_per_token = train_flops_per_token(self.model_config, cfg.seq_len)
        self.peak_tflops = measure_dense_tflops(self.device) if self.device.type == "cuda" else None
        self.last_eval: dict | None = None
        self.last_record: dict | None = None
        self.corpus_documents = len(docs)

    def _prepare_data(self, docs, tokenizer_path: str | None, cache_dir: Path | None) -> None:
        cfg = self.cfg
        corpus = prepare_corpus(docs, val_fraction=cfg.val_fraction, vocab_size=cfg.vocab_size, cache_dir=cache_dir,
                                tokenizer_path=tokenizer_path)
        self.tokenizer, self.shards = corpus.tokenizer, corpus.shards
        check_enough_tokens(self.shards, cfg.seq_len)
        self.val_windows = eval_windows(self.shards.val, cfg.seq_len, cfg.eval_tokens)
        self.model_config = cfg.model_config(self.tokenizer.vocab_size, self.tokenizer.bos_id, self.tokenizer.eos_id)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg, self.total_steps)
        set_lr(self.optimizer, lr)
        batches = step_batches(self.shards.train, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                               grad_accum=self.grad_accum, seed=cfg.seed, step=self.step,
                               dp_rank=self.reducer.rank, dp_size=self.reducer.world_size)
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        mtp_sum = torch.zeros((), device=self.device)
        with_mtp = self.model_config.num_nextn_predict_layers > 0
        counts = None
        for batch in batches:
            ids = torch.from_numpy(batch).to(self.device, non_blocking=True)
            targets = ids[:, 1:]
            with self._autocast():
                out = self.forward(ids[:, :-1], with_mtp=with_mtp)
            logits = out[0] if with_mtp else out
            loss = lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            if with_mtp:
                mtp = mtp_loss(out[1], targets)
                loss = lm + cfg.mtp_loss_weight * mtp
                mtp_sum += mtp.detach()
            step_counts, aux = model.routing_stats()  # this micro-batch's, before the next forward rewrites them
            counts = step_counts.clone() if counts is None else counts + step_counts
            aux_sum += aux.float().to(self.device)
            lm_sum += lm.detach()
            (loss / self.grad_accum).backward()  # the balance loss joins in backward (AddAuxiliaryLoss)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self._clip_grad_norm(model.parameters(), max_norm)
        losses = self.reducer.mean(torch.stack([lm_sum, aux_sum, mtp_sum]) / self.grad_accum)
        counts = self.reducer.sum(counts)
        lm_loss, aux_loss, mtp_loss_value, norm = \
            torch.cat([losses, grad_norm.float().reshape(1).to(self.device)]).tolist()
        ok = all(math.isfinite(x) for x in (lm_loss, aux_loss, mtp_loss_value, norm))
        if ok:
            self.optimizer.step()
            if cfg.bias_update_gamma > 0 and counts.numel():
                model.update_expert_bias(counts, cfg.bias_update_gamma)
            self.consecutive_skips = 0
        else:
            self.skipped += 1
            self.consecutive_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.sequences_per_step * cfg.seq_len
        if self.consecutive_skips >= cfg.max_skipped_steps:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive_skips} steps in a row (up to step {self.step}) had a "
                "non-finite loss or gradient; lower --lr, or continue from the last checkpoint with --resume")
        counts_cpu = counts.cpu()
        if ok and counts_cpu.numel():
            self.load_counts += counts_cpu.numpy()
        return {"lm_loss": lm_loss, "aux_loss": aux_loss, "mtp_loss": mtp_loss_value if with_mtp else None,
                "grad_norm": norm, "lr": lr, "ok": ok,
                "maxvio": max_violation(counts_cpu).tolist() if counts_cpu.numel() else []}

    def _clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """torch's in one process; sharded gradients (FSDP2 and expert-parallel DTensors on different meshes)
        need the global norm of dsmoe.distributed."""
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        from dsmoe.distributed.runtime import clip_grad_norm_

        return clip_grad_norm_(parameters, max_norm)

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None, time_limit: float | None = None) -> dict:
        """Run until the budget (or `stop_after` more steps, or `time_limit` seconds) is spent; evaluate,
        checkpoint and export the model at the end. Returns the summary printed by the CLI."""
        cfg = self.cfg
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        if self.main and self.step == 0:
            self._say(self.describe())
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, smoothing=0.1)
        window: list[dict] = []
        start = window_start = time.perf_counter()
        paused = 0.0  # seconds of evaluation and saving inside the current window: not training throughput
        saved_at = evaluated_at = None
        while self.step < end:
            window.append(self.train_step())
            bar.update(1)
            last = self.step == end or (time_limit is not None and self._past(start + time_limit))
            if self.step % cfg.log_interval == 0 or last:
                now = time.perf_counter()
                record = self._log_record(window, now - window_start - paused, now - start)
                window, window_start, paused = [], now, 0.0
                bar.set_postfix_str(f"loss {record['loss']:.3f}, {record['tokens_per_s']:,.0f} tok/s"
                                    + (f", MFU {record['mfu']:.1%}" if "mfu" in record else ""))
            side_start = time.perf_counter()
            if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                self.evaluate_and_plot(bar)
                evaluated_at = self.step
            if self.step % cfg.checkpoint_interval == 0:
                self.save_checkpoint(time.perf_counter() - start)
                saved_at = self.step
            paused += time.perf_counter() - side_start
            if last and self.step < end:
                self._say(f"time limit of {time_limit:.0f}s reached at step {self.step}")
                break
        bar.close()
        elapsed = time.perf_counter() - start
        if evaluated_at != self.step:
            self.evaluate_and_plot(None)
        if saved_at != self.step:
            self.save_checkpoint(elapsed)
        if self.distributed:
            from dsmoe.distributed.checkpoint import export_hub

            export_hub(self.model, self.out)  # gathered one parameter at a time; rank 0 writes
        else:
            save_pretrained(self.model, self.out)
        if self.main:
            self.metrics.close()
        summary = {"run": str(self.out), "steps": self.step, "total_steps": self.total_steps,
                   "tokens": self.tokens_seen, "skipped_steps": self.skipped,
                   "elapsed_s": round(self.elapsed_before + elapsed, 1)}
        if self.last_eval:
            summary.update({k: v for k, v in self.last_eval.items() if k != "step"})
        if self.last_record:  # the throughput of the last logged window (after compilation and warm-up)
            summary.update({k: self.last_record[k] for k in ("tokens_per_s", "mfu") if k in self.last_record})
        return summary

    def _past(self, deadline: float) -> bool:
        """Whether any rank's clock has passed the deadline: every rank stops after the same step."""
        over = torch.tensor([float(time.perf_counter() > deadline)], device=self.device)
        return bool(self.reducer.sum(over).item() > 0)

    def _log_record(self, window: list[dict], seconds: float, elapsed: float) -> dict:
        good = [r for r in window if r["ok"]] or window
        mean = lambda key: float(np.mean([r[key] for r in good]))
        maxvio = np.mean([r["maxvio"] for r in good], axis=0).tolist() if good[0]["maxvio"] else []
        tokens_per_s = len(window) * self.sequences_per_step * self.cfg.seq_len / max(seconds, 1e-9)
        record = {"step": self.step, "tokens": self.tokens_seen, "loss": mean("lm_loss") + mean("aux_loss"),
                  "lm_loss": mean("lm_loss"), "aux_loss": mean("aux_loss"), "lr": window[-1]["lr"],
                  "grad_norm": mean("grad_norm"), "tokens_per_s": tokens_per_s, "maxvio": maxvio,
                  "maxvio_mean": float(np.mean(maxvio)) if maxvio else None, "skipped_steps": self.skipped,
                  "elapsed_s": round(self.elapsed_before + elapsed, 2)}
        if good[0]["mtp_loss"] is not None:  # the mean MTP cross-entropy, before lambda; not part of "loss"
            record["mtp_loss"] = mean("mtp_loss")
        if self.peak_tflops:
            per_gpu = tokens_per_s / self.reducer.world_size
            record["mfu"] = self.flops_per_token * per_gpu / (self.peak_tflops * 1e12)
        if self.main:
            self.metrics.write(record)
        self.last_record = record
        return record

    # ------------------------------------------------------------------ evaluation, plots, saving
    def evaluate(self) -> dict | None:
        if not self.val_windows:
            return None
        loss, n = evaluate_loss(self.model, self.val_windows, batch_size=self.cfg.micro_batch, device=self.device,
                                autocast_dtype=self.autocast_dtype, reducer=self.reducer)
        return {"step": self.step, "val_loss": loss, "val_ppl": perplexity(loss),
                "val_nats_per_byte": loss * self.shards.val_tokens_per_byte, "val_tokens": n}

    def evaluate_and_plot(self, bar) -> None:
        result = self.evaluate()
        if not self.main:
            return
        if result is not None:
            self.last_eval = result
            self.metrics.write(result)
            line = (f"step {self.step}/{self.total_steps}: val loss {result['val_loss']:.4f} | ppl "
                    f"{result['val_ppl']:.2f} | {result['val_nats_per_byte']:.4f} nats/byte | skipped "
                    f"{self.skipped}")
            (bar.write if bar is not None else self._say)(line)
        plots = _plots()
        if plots is None:
            return
        plots.plot_loss(self.metrics.records, self.out / "plots" / "loss.png")
        if self.load_counts.size and self.load_counts.sum():
            plots.plot_expert_load(self.load_counts, self.model_config.moe_layer_ids,
                                   self.out / "plots" / "expert_load.png",
                                   f"expert load, steps {self.load_since + 1}-{self.step}")
            self.load_counts[:] = 0
            self.load_since = self.step

    def save_checkpoint(self, elapsed: float) -> Path | None:
        """Every rank calls it (a sharded save is collective)."""
        state = {"tokens_seen": self.tokens_seen, "skipped_steps": self.skipped,
                 "consecutive_skips": self.consecutive_skips, "elapsed_s": self.elapsed_before + elapsed,
                 "total_steps": self.total_steps, "lr": lr_at(max(self.step - 1, 0), self.cfg, self.total_steps),
                 "data": {"seed": self.cfg.seed, "next_step": self.step, "sequences_per_step": self.sequences_per_step},
                 "train_config": self.cfg.to_dict()}
        return checkpoints.save(self.out / "checkpoints", self.step, self.model, self.optimizer, state,
                                keep=self.cfg.keep_checkpoints, reducer=self.reducer)

    def describe(self) -> str:
        c, cfg = self.model_config, self.cfg
        meta = self.shards.meta
        data = ", ".join(cfg.data) if cfg.data else "built-in corpus (Python standard library)"
        precision = "bf16 autocast" if self.autocast_dtype else "fp32"
        where = str(self.device)
        if self.distributed:
            dims = self.reducer.mesh.dims
            where = f"{self.reducer.world_size} ranks ({self.device.type}, expert parallel {dims.ep} x data parallel " \
                    f"{dims.dp}, {self.grad_accum} micro-batches of {cfg.micro_batch} per rank)"
        return (f"model: {cfg.preset} preset, {c.num_params() / 1e6:.1f}M parameters "
                f"({c.num_params(active=True) / 1e6:.1f}M active), vocab {c.vocab_size}\n"
                f"data: {data}: {self.corpus_documents} documents, {meta['train_tokens']:,} train / "
                f"{meta['val_tokens']:,} validation tokens\n"
                f"plan: {self.total_steps} steps x {self.sequences_per_step * cfg.seq_len:,} tokens on "
                f"{where} ({precision}{', compiled' if cfg.compile else ''}) -> {self.out}")

    def _say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)
