"""The training loop: batches -> model -> loss -> guarded optimizer step -> aux-free bias update -> metrics,
evaluations, checkpoints and plots in the run folder.

One optimizer step = grad_accum micro-batches from the batch source, each through the loss function (loss.py:
the seam that fine-tuning and multi-token prediction plug into). After each micro-batch forward the trainer
reads the model's routing statistics (expert counts, balance loss); after the step it updates the
aux-loss-free router biases from the step's summed counts.

Nothing is read back to the host during a step: losses, gradient norm, expert counts and the "finite" flag
stay on the device. A step whose loss or gradient norm is not finite is skipped on the device: the fused AdamW
kernel receives the flag as `found_inf` (parameters, moments and step count stay as they were) and the bias
update gets zero counts. The statistics of the steps are read back together every log_interval steps (and
before a checkpoint); that is where skipped steps are counted and where `max_skipped_steps` non-finite steps
in a row abort the run, so up to log_interval - 1 further steps may run before the abort.

Under torchrun the reducer is the distributed runtime (dsmoe.distributed.runtime.Runtime) and the same loop runs
data parallel x expert parallel: every rank builds the same model from the seed, which parallelize() then shards
(EP, FSDP2, activation checkpointing, compile); each rank reads its own slice of every global batch; losses,
expert counts and evaluation sums are reduced over all ranks, and FSDP averages the gradients, so a step equals
one process's step over the same global batch. Rank 0 alone writes the run folder (config, tokenizer, metrics,
plots); checkpoints and the final export are collective (dsmoe.checkpoint).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsmoe.checkpoint.hf import save_pretrained
from dsmoe.checkpoint.training import load_checkpoint, read_state, save_checkpoint
from dsmoe.data.batches import micro_batches_per_rank
from dsmoe.data.prepare import read_documents
from dsmoe.data.tokenizer import MIN_VOCAB, Tokenizer
from dsmoe.devices import resolve_device
from dsmoe.errors import UserError
from dsmoe.model.balance import max_violation
from dsmoe.tasks.perplexity import evaluate_windows, perplexity
from dsmoe.train.config import TrainConfig
from dsmoe.train.data import TrainingData, pretraining_data
from dsmoe.train.describe import pretraining as describe_pretraining
from dsmoe.train.flops import dense_tflops, train_flops_per_token
from dsmoe.train.loss import LossFn, next_token_loss
from dsmoe.train.metrics import MetricsLog, require_tensorboard, window_means
from dsmoe.train.model_setup import build_training_model
from dsmoe.train.optim import build_optimizer, lr_at, set_lr
from dsmoe.train.reduce import SingleProcess
from dsmoe.train.run_folder import empty_run_folder, open_run_for_resume, start_run_folder

log = logging.getLogger(__name__)


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


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 reducer=None, cache_dir: Path | None = None, progress: bool = True, sharded_init: bool = False,
                 data: TrainingData | None = None, loss_fn: LossFn | None = None):
        """reducer: None in one process, the dsmoe.distributed Runtime under torchrun. sharded_init (torchrun
        only): build the model on the meta device and initialise each rank's shards after sharding, for models
        that do not fit whole on one device (the weights then differ from a one-process run's). data: what to
        train on (default: the pretraining corpus of cfg.data); loss_fn: (model, batch) -> (loss, metrics)
        (default: next-token cross-entropy)."""
        self.cfg, self.out = cfg, Path(out)
        self.loss_fn = loss_fn or functools.partial(next_token_loss, mtp_weight=cfg.mtp_loss_weight,
                                                    mtp_targets=cfg.mtp_targets)
        self._setup_process(reducer, progress)
        cfg.model_config(MIN_VOCAB, 0, 1)  # bad overrides or seq_len fail before any work
        resume_from = open_run_for_resume(self.out, cfg) if resume else None
        self._setup_batch_layout(resume_from)
        docs = None if data else read_documents(cfg.data, cfg.text_field, cfg.corpus_limit_bytes())  # fails early
        if not resume and not data and cfg.tokenizer:
            Tokenizer.load(cfg.tokenizer)  # a wrong --tokenizer fails before the run folder exists
        if not resume and self.main:
            start_run_folder(self.out, cfg, overwrite)
        try:
            self.data = data or pretraining_data(cfg, docs, self.reducer, str(self.out) if resume else cfg.tokenizer,
                                                 cache_dir, self.out)
        except UserError:  # e.g. too little text for --seq-len: a run that never started must not block its retry
            if not resume and self.main:
                empty_run_folder(self.out)
            raise
        self.model_config = cfg.model_config(self.data.vocab_size, self.data.bos_id, self.data.eos_id)
        self.model = self._build_model(sharded_init)
        self.optimizer = build_optimizer(self.model, cfg)
        self._restore(resume_from)
        self._setup_metrics(resume)

    # ------------------------------------------------------------------ construction, step by step
    def _setup_process(self, reducer, progress: bool) -> None:
        """Which process this is, its device and its precision."""
        cfg = self.cfg
        self.reducer = reducer or SingleProcess()
        self.main = self.reducer.is_main
        self.distributed = self.reducer.world_size > 1
        self.progress = progress and self.main
        if cfg.tensorboard and self.main:
            require_tensorboard()
        self.device = self.reducer.device if self.distributed else resolve_device(cfg.device)
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 and cfg.param_dtype == "fp32" else None

    # ---- what fine-tuning overrides (dsmoe.finetune.trainer): the model it starts from, what a checkpoint
    # ---- holds of it, what the run exports, how an evaluation reads
    def _build_model(self, sharded_init: bool):
        return build_training_model(self.model_config, self.cfg, self.device, self.reducer, self.grad_accum,
                                    sharded_init)

    def _checkpointed(self):
        return self.model

    def _export(self) -> None:
        save_pretrained(self.model, self.out)  # sharded: gathered one parameter at a time, rank 0 writes

    def _eval_line(self, result: dict) -> str:
        per_byte = f" | {result['val_nats_per_byte']:.4f} nats/byte" if "val_nats_per_byte" in result else ""
        mtp = (f" | mtp loss {result['val_mtp_loss']:.4f}, first drafts agree {result['val_draft_agreement']:.1%}"
               if "val_mtp_loss" in result else "")
        return (f"step {self.step}/{self.total_steps}: val loss {result['val_loss']:.4f} | ppl "
                f"{result['val_ppl']:.2f}{per_byte}{mtp} | skipped {self.skipped}")

    def _setup_batch_layout(self, resume_from: Path | None) -> None:
        """The global batch (sequences per optimizer step) is fixed when the run starts; resumed on another number
        of ranks, each rank accumulates more or fewer micro-batches so that the steps stay the same."""
        cfg = self.cfg
        self.sequences_per_step = cfg.micro_batch * cfg.grad_accum * self.reducer.world_size
        if resume_from is not None:
            data = read_state(resume_from)["data"]
            self.sequences_per_step = data.get("sequences_per_step", cfg.micro_batch * cfg.grad_accum)
        self.grad_accum = micro_batches_per_rank(cfg.micro_batch, self.sequences_per_step, self.reducer.world_size)
        self.total_steps = cfg.total_steps(self.sequences_per_step // (cfg.micro_batch * cfg.grad_accum))

    def _restore(self, resume_from: Path | None) -> None:
        """Counters, and (resuming) weights, optimizer and RNG states from the checkpoint."""
        self.step = self.skipped = self.consecutive_skips = 0
        self.tokens_seen, self.elapsed_before = 0, 0.0
        self.evaluated_at: int | None = None  # the step of the last validation
        if resume_from is None:
            return
        state = load_checkpoint(resume_from, self._checkpointed(), self.optimizer, seed=self.cfg.seed)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped, self.consecutive_skips = state["skipped_steps"], state["consecutive_skips"]
        self.elapsed_before = state["elapsed_s"]
        self.evaluated_at = state.get("evaluated_at")  # absent in checkpoints of earlier versions

    def _setup_metrics(self, resume: bool) -> None:
        cfg = self.cfg
        self.metrics = MetricsLog(self.out, resume_step=self.step if resume else None,
                                  tensorboard=cfg.tensorboard) if self.main else None
        experts = self.model_config.n_routed_experts or 0
        self.load_counts = torch.zeros(len(self.model.moe_layers()), experts, dtype=torch.int64, device=self.device)
        self.load_since = self.step
        self.flops_per_token = train_flops_per_token(self.model_config, cfg.seq_len)
        self.pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, on-device statistics) not read yet
        self.metric_names: list[str] = []
        self.window: list[dict] = []  # host records of the steps since the last log record
        # resumed: the last validation so far (a run resumed at its end is not validated again, see train())
        self.last_eval: dict | None = next((r for r in reversed(self.metrics.records) if "val_loss" in r), None) \
            if resume and self.main else None
        self.last_record: dict | None = None
        self.ep_layers: list = []  # the model's expert-parallel experts (their dispatch statistics)
        if self.distributed:
            from dsmoe.distributed.expert_parallel import ep_layers

            self.ep_layers = ep_layers(self.model)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> None:
        """One optimizer step, without a host sync; `read_steps` returns its statistics."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg, self.total_steps)
        set_lr(self.optimizer, lr)
        batches = self.data.train.batches(self.step, micro_batch=cfg.micro_batch, grad_accum=self.grad_accum,
                                          dp_rank=self.reducer.rank, dp_size=self.reducer.world_size)
        sums = counts = None  # sums: [loss, balance loss, *metrics] over the micro-batches
        for batch in batches:
            with self._autocast():
                loss, metrics = self.loss_fn(model, batch.to(self.device))
            metrics = {**metrics, **self._dispatch_metrics()}
            if self.model_config.routing_top_p is not None:  # how many experts adaptive routing gives a token
                metrics["experts_per_token"], metrics["routed_tokens"] = model.routed_load()  # ratio below
            step_counts, aux = model.routing_stats()  # this micro-batch's, before the next forward rewrites them
            self.metric_names = list(metrics)
            values = torch.stack([loss.detach().float(), aux.float().to(self.device),
                                  *(metrics[k].detach().float() for k in self.metric_names)])
            sums = values if sums is None else sums + values
            counts = step_counts.clone() if counts is None else counts + step_counts
            (loss / self.grad_accum).backward()  # the balance loss joins in backward (AddAuxiliaryLoss)
        grad_norm = self._clip_grad_norm(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        means = self.reducer.mean(sums / self.grad_accum)
        if "routed_tokens" in self.metric_names:
            # the step's experts per token: used decisions / real tokens, so micro-batches and ranks weigh by their
            # tokens (a mean of per-micro-batch ratios would not, with padding)
            used, tokens = (2 + self.metric_names.index(n) for n in ("experts_per_token", "routed_tokens"))
            means[used] = means[used] / means[tokens].clamp_min(1)
        counts = self.reducer.sum(counts)
        ok = torch.isfinite(means[:2]).all() & torch.isfinite(grad_norm.float().to(self.device))
        self.optimizer.found_inf = (~ok).float()  # fused AdamW leaves everything as it was when this is 1
        self.optimizer.step()
        if counts.numel():
            counts = counts * ok  # a skipped step's counts move neither the biases nor the load plot
            if cfg.bias_update_gamma > 0:
                model.update_expert_bias(counts, cfg.bias_update_gamma)  # zero counts: sign(0) = no change
            self.load_counts += counts
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.sequences_per_step * cfg.seq_len
        maxvio = max_violation(counts).to(self.device) if counts.numel() else torch.zeros(0, device=self.device)
        self.pending.append((self.step, lr, torch.cat([ok.float()[None], means, grad_norm.float().reshape(1)
                                                       .to(self.device), maxvio])))

    def read_steps(self) -> list[dict]:
        """Read the statistics of the steps since the last call back to the host (one transfer), count the
        skipped steps and abort after max_skipped_steps non-finite ones in a row. -> their records."""
        if not self.pending:
            return []
        rows = torch.stack([row for _, _, row in self.pending]).cpu().tolist()
        names = ["loss", "aux_loss", *self.metric_names]
        records = []
        for (step, lr, _), row in zip(self.pending, rows):
            ok = row[0] > 0
            values = dict(zip(names, row[1:1 + len(names)]))
            values.pop("routed_tokens", None)  # only the denominator of experts_per_token
            record = {**values, "loss": values["loss"] + values["aux_loss"], "grad_norm": row[1 + len(names)],
                      "maxvio": row[2 + len(names):], "lr": lr, "ok": ok, "step": step}
            records.append(record)
            self.consecutive_skips = 0 if ok else self.consecutive_skips + 1
            self.skipped += not ok
            if self.consecutive_skips >= self.cfg.max_skipped_steps:
                self.pending.clear()
                raise TrainingDiverged(
                    f"training diverged: {self.consecutive_skips} steps in a row (up to step {step}) had a "
                    "non-finite loss or gradient; lower --lr, or continue from the last checkpoint with --resume")
        self.pending.clear()
        self.window += records
        return records

    def _dispatch_metrics(self) -> dict[str, torch.Tensor]:
        """Under expert parallelism, ep_dropped: the share of the micro-batch's routing decisions that the
        capacity-bounded dispatch dropped (--ep-capacity-factor; 0 with the exact dispatch)."""
        if not self.ep_layers:
            return {}
        from dsmoe.distributed.expert_parallel import dropped_share

        return {"ep_dropped": dropped_share(self.ep_layers)}

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
        if self.main and self.step == 0:
            self._say(self.describe())
        elapsed, saved_at = self.run(stop_after, time_limit)
        if self.evaluated_at != self.step:  # resumed at the last step: it was evaluated before that save
            self.evaluate_and_plot(None)
        stopped_early = self.step < self.total_steps  # --stop-after / --time-limit: --resume needs a checkpoint
        if saved_at != self.step and (self.cfg.checkpoint_interval or stopped_early):
            self.save_checkpoint(elapsed)
        self._export()
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

    def run(self, stop_after: int | None = None, time_limit: float | None = None) -> tuple[float, int | None]:
        """The steps with their logging, evaluations and checkpoints as configured, without the final
        evaluation, checkpoint and export (what `dsmoe bench train` times). The last step is always logged.
        -> (seconds, step of the last checkpoint or None)."""
        cfg = self.cfg
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, smoothing=0.1)
        self.window = []
        start = window_start = time.perf_counter()
        paused = 0.0  # seconds of evaluation and saving inside the current window: not training throughput
        saved_at = None
        while self.step < end:
            self.train_step()
            bar.update(1)
            last = self.step == end or (time_limit is not None and self._past(start + time_limit))
            if self.step % cfg.log_interval == 0 or last:
                self.read_steps()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the window ends when its last step has finished
                now = time.perf_counter()
                record = self._log_record(self.window, now - window_start - paused, now - start)
                self.window, window_start, paused = [], time.perf_counter(), 0.0  # MFU's first GEMM rate: paused
                bar.set_postfix_str(f"loss {record['loss']:.3f}, {record['tokens_per_s']:,.0f} tok/s"
                                    + (f", MFU {record['mfu']:.1%}" if "mfu" in record else ""))
            side_start = time.perf_counter()
            if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                self.evaluate_and_plot(bar)
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                self.save_checkpoint(time.perf_counter() - start)
                saved_at = self.step
            paused += time.perf_counter() - side_start
            if last and self.step < end:
                self._say(f"time limit of {time_limit:.0f}s reached at step {self.step}")
                break
        bar.close()
        return time.perf_counter() - start, saved_at

    def _past(self, deadline: float) -> bool:
        """Whether any rank's clock has passed the deadline: every rank stops after the same step."""
        over = float(time.perf_counter() > deadline)
        if not self.distributed:
            return over > 0
        return bool(self.reducer.sum(torch.tensor([over], device=self.device)).item() > 0)

    def _log_record(self, window: list[dict], seconds: float, elapsed: float) -> dict:
        tokens_per_s = sum(self._step_tokens(r) for r in window) / max(seconds, 1e-9)
        record = {"step": self.step, "tokens": self.tokens_seen, **window_means(window, self.metric_names),
                  "tokens_per_s": tokens_per_s, "skipped_steps": self.skipped,
                  "elapsed_s": round(self.elapsed_before + elapsed, 2)}
        if self.device.type == "cuda":  # measured once per process, the first time it is needed
            record["mfu"] = self.flops_per_token * tokens_per_s / self.reducer.world_size / (
                dense_tflops(self.device) * 1e12)
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.main:
            self.metrics.write(record)
        self.last_record = record
        return record

    def _step_tokens(self, record: dict) -> float:
        """Tokens one step trained on: its loss function's "trained_tokens" (mean per micro-batch; fine-tuning
        pads, so its batches hold fewer than seq_len tokens a row) or the full windows of pretraining."""
        if "trained_tokens" in record:
            return record["trained_tokens"] * self.grad_accum * self.reducer.world_size
        return self.sequences_per_step * self.cfg.seq_len

    # ------------------------------------------------------------------ evaluation, plots, saving
    def evaluate(self) -> dict | None:
        if not self.data.val_windows:
            return None
        stats = evaluate_windows(self.model, self.data.val_windows, batch_size=self.cfg.micro_batch,
                                 device=self.device, autocast_dtype=self.autocast_dtype, reducer=self.reducer,
                                 drafts=len(getattr(self.model, "mtp", ())) > 0)
        loss = stats["loss"]
        result = {"step": self.step, "val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": stats["tokens"]}
        if "mtp_loss" in stats:
            result.update(val_mtp_loss=stats["mtp_loss"], val_draft_agreement=stats["draft_agreement"])
        if self.data.val_tokens_per_byte is not None:
            result["val_nats_per_byte"] = loss * self.data.val_tokens_per_byte
        return result

    def evaluate_and_plot(self, bar) -> None:
        result = self.evaluate()
        self.evaluated_at = self.step
        if not self.main:
            return
        if result is not None:
            self.last_eval = result
            self.metrics.write(result)
            (bar.write if bar is not None else self._say)(self._eval_line(result))
        plots = _plots()
        if plots is None:
            return
        plots.plot_loss(self.metrics.records, self.out / "plots" / "loss.png")
        load = self.load_counts.cpu().numpy()
        if load.size and load.sum():
            plots.plot_expert_load(load, self.model_config.moe_layer_ids, self.out / "plots" / "expert_load.png",
                                   f"expert load, steps {self.load_since + 1}-{self.step}")
            self.load_counts.zero_()
            self.load_since = self.step

    def save_checkpoint(self, elapsed: float) -> Path | None:
        """Every rank calls it (a sharded save is collective)."""
        self.read_steps()  # the skip counters of every step so far
        state = {"tokens_seen": self.tokens_seen, "skipped_steps": self.skipped,
                 "consecutive_skips": self.consecutive_skips, "elapsed_s": self.elapsed_before + elapsed,
                 "total_steps": self.total_steps, "evaluated_at": self.evaluated_at,
                 "lr": lr_at(max(self.step - 1, 0), self.cfg, self.total_steps),
                 "data": {"seed": self.cfg.seed, "next_step": self.step, "sequences_per_step": self.sequences_per_step},
                 "train_config": self.cfg.to_dict()}
        return save_checkpoint(self.out / "checkpoints", self.step, self._checkpointed(), self.optimizer, state,
                               keep=self.cfg.keep_checkpoints)

    def describe(self) -> str:
        return describe_pretraining(self)

    def _say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)
