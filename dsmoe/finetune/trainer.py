"""Fine-tuning on the one trainer loop: `FinetuneTrainer` hands the Trainer its data (a batch source of
packed or padded examples, finetune/data.py) and its loss, and overrides the model it starts from (BASE, a
head, LoRA, frozen parts), what a checkpoint holds, the evaluation and the export. The step, clipping, schedule,
aux-free bias update, MaxVio, metrics, checkpoints and resume are the pretraining trainer's own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsmoe.atomic import atomic_write_text
from dsmoe.checkpoint.hf import build_pretrained, checkpoint_files, load_pretrained, read_config, save_pretrained
from dsmoe.checkpoint.peft_adapter import save_adapter
from dsmoe.checkpoint.ranks import local_part
from dsmoe.data.tokenizer import copy_tokenizer_files, load_tokenizer
from dsmoe.errors import UserError
from dsmoe.finetune import data as ftdata
from dsmoe.finetune.classifier import classifier_from_base, new_score, pad_id_of
from dsmoe.finetune.lora import LoRASpec, adapted_modules, apply_lora, lora_factors, merge_lora
from dsmoe.finetune.metrics import classification_scores
from dsmoe.json_files import read_json
from dsmoe.model.classifier import SequenceClassifier
from dsmoe.model.mtp import new_mtp_module, set_mtp_depth
from dsmoe.train.data import TrainingData
from dsmoe.train.describe import plan as plan_line
from dsmoe.train.loss import next_token_loss
from dsmoe.train.model_setup import prepare_and_parallelize, seed_per_rank
from dsmoe.train.trainer import Trainer

TASKS = ("sft", "classify", "lm")
# 2: packed SFT rows and expert-major LoRA factors; a checkpoint of another format does not resume
CHECKPOINT_FORMAT = 2
FREEZABLE = ("router", "experts", "embeddings", "main")


def saved_options(out: Path, fix: str) -> dict:
    """The FinetuneConfig fields a fine-tune in `out` started with; a folder of another checkpoint format cannot
    resume (one clear error)."""
    options = read_json(Path(out) / "finetune_config.json", fix)
    if options.pop("checkpoint_format", 1) != CHECKPOINT_FORMAT:
        raise UserError(f"{out} was written by an older dsmoe (padded SFT batches, LoRA expert factors laid out "
                        "otherwise), so its checkpoints cannot resume; start a new run with --out NEW_FOLDER")
    return options


@dataclass
class FinetuneConfig:
    base: str
    task: str
    data: list[str]
    eval_data: str | None = None
    field_map: list[str] = field(default_factory=list)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    merge: bool = False

    def __post_init__(self):
        if isinstance(self.data, str):  # a fine-tune saved when --data took one file
            self.data = [self.data]
        if self.task not in TASKS:
            raise UserError(f"--task {self.task}: choose one of {', '.join(TASKS)}")
        bad = [f for f in self.freeze if f not in FREEZABLE]
        if bad:
            raise UserError(f"--freeze {bad[0]}: choose from {', '.join(FREEZABLE)}")
        if self.merge and not self.lora_rank:
            raise UserError("--merge folds a LoRA adapter into the weights: give --lora-rank too (a full fine-tune "
                            "already writes the whole model)")

    def lora(self) -> LoRASpec | None:
        return LoRASpec.parse(self.lora_rank, self.lora_alpha, self.lora_targets) if self.lora_rank else None


class FinetuneTrainer(Trainer):
    def __init__(self, cfg, ft: FinetuneConfig, out, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, reducer=None):
        """reducer: None in one process, the dsmoe.distributed Runtime under torchrun (as for Trainer)."""
        self.cfg, self.ft, self.lora, out = cfg, ft, ft.lora(), Path(out)
        saved = out / "finetune_config.json"
        if resume and saved.is_file() and FinetuneConfig(**saved_options(out, "restore it or start a new run")) != ft:
            raise UserError(f"{out} was fine-tuned with other finetune options ({saved}); resume with the same "
                            "ones, or start a new run with --out NEW_FOLDER")
        base = Path(ft.base)
        self.base_config, _ = read_config(base)
        checkpoint_files(base)  # a bad BASE fails here, before the run folder exists
        if cfg.seq_len > self.base_config.max_position_embeddings:
            raise UserError(f"--seq-len {cfg.seq_len} is beyond {base}'s max_position_embeddings "
                            f"({self.base_config.max_position_embeddings}); lower --seq-len")
        # The preset is not used (the model is BASE); its context check must not refuse BASE's --seq-len.
        cfg.model = {**cfg.model, "max_position_embeddings": self.base_config.max_position_embeddings}
        self._check_mtp_options(cfg, ft)
        self.pad_id = pad_id_of(self.base_config)
        self.base_tokenizer = load_tokenizer(base)
        if ft.task == "lm":  # continued pretraining: the corpus pipeline, with BASE's tokenizer
            cfg.data, cfg.tokenizer = list(ft.data), str(base)
            super().__init__(cfg, out, resume=resume, overwrite=overwrite, progress=progress, reducer=reducer)
        else:
            super().__init__(cfg, out, resume=resume, overwrite=overwrite, progress=progress, reducer=reducer,
                             data=self._read_data(),
                             loss_fn=self._classify_loss if ft.task == "classify" else self._sft_loss)
        if self.main:
            copy_tokenizer_files(base, out)
            if not resume:
                options = {**dataclasses.asdict(ft), "checkpoint_format": CHECKPOINT_FORMAT}
                atomic_write_text(saved, json.dumps(options, indent=2) + "\n")

    def _check_mtp_options(self, cfg, ft: FinetuneConfig) -> None:
        """--mtp-layers N sets BASE's number of MTP modules (new ones train from scratch); --freeze main trains only
        them (a draft head for speculative decoding on a model that ships none)."""
        have = self.base_config.num_nextn_predict_layers
        depth = have if cfg.mtp_layers is None else cfg.mtp_layers
        if ft.task == "classify" and (cfg.mtp_layers is not None or "main" in ft.freeze):
            raise UserError("--mtp-layers and --freeze main are for --task sft and lm (a classifier predicts no "
                            "tokens and keeps no MTP modules): drop them")
        if depth > have and self.lora:
            raise UserError(f"--mtp-layers {depth} adds MTP modules to {ft.base} (it has {have}); new modules train "
                            "in full: drop --lora-rank, or add them in a full fine-tune first")
        if "main" in ft.freeze and (self.lora or not depth or not cfg.mtp_loss_weight):
            raise UserError("--freeze main trains only the MTP modules: give --mtp-layers N (N >= 1), a positive "
                            "--mtp-loss-weight and no --lora-rank")

    # ---- data
    def _read_data(self) -> TrainingData:
        ft, tok, seq_len = self.ft, self.base_tokenizer, self.cfg.seq_len
        mapping = ftdata.parse_field_map(ft.field_map)
        train = [record for path in ft.data for record in ftdata.read_jsonl(path, mapping)]
        evals = ftdata.read_jsonl(ft.eval_data, mapping) if ft.eval_data else []
        self.dropped = 0
        if ft.task == "classify":
            self.labels = ftdata.label_set(train)
            if len(self.labels) < 2:
                raise ftdata.DataError(f"every training record has the label {self.labels[0]!r}: a classifier "
                                       "needs at least two labels in its training data")
            ftdata.label_set(evals)
            self.train_examples = ftdata.encode_classify(train, tok, self.labels, seq_len)
            self.eval_examples = ftdata.encode_classify(evals, tok, self.labels, seq_len)
        else:
            template = tok.chat_template
            self.train_examples, self.dropped = ftdata.encode_sft(train, tok, template, seq_len)
            self.eval_examples, _ = ftdata.encode_sft(evals, tok, template, seq_len)
            if not self.train_examples:
                raise UserError(f"{', '.join(ft.data)}: no example keeps a target token within --seq-len {seq_len}; "
                                "raise --seq-len")
        description = (f"{', '.join(ft.data)}: {len(self.train_examples)} examples"
                       + (f" ({self.dropped} dropped: no target token within --seq-len)" if self.dropped else "")
                       + (f", eval {ft.eval_data}: {len(self.eval_examples)}" if ft.eval_data else "")
                       + (f", labels {', '.join(self.labels)}" if ft.task == "classify" else ""))
        source = ftdata.ExampleSource(self.train_examples, self.cfg.seed, self.pad_id) if ft.task == "classify" \
            else ftdata.PackedSource(self.train_examples, self.cfg.seed, self.pad_id, seq_len)
        return TrainingData(train=source,
                            vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, description=description)

    # ---- the losses (the trainer's loss seam); "trained_tokens" makes tokens/s count real, unpadded tokens
    def _sft_loss(self, model, batch):
        loss, metrics = next_token_loss(model, batch, mtp_weight=self.cfg.mtp_loss_weight,
                                        mtp_targets=self.cfg.mtp_targets)
        return loss, {**metrics, "trained_tokens": batch.token_mask.sum().float()}

    def _classify_loss(self, model, batch):
        loss = F.cross_entropy(model.classify(batch.ids, batch.lengths), batch.labels)
        return loss, {"cls_loss": loss.detach(), "trained_tokens": batch.lengths.sum().float()}

    # ---- model
    def _build_model(self, sharded_init: bool):
        """BASE, the head, LoRA and the frozen parts, then the pretraining path: parallelize() shards it under
        torchrun (FSDP2, EP; frozen and trainable weights side by side). One process loads BASE whole first; under
        torchrun all of this happens on the meta device and each rank then reads only its own shards of BASE and
        draws the head and LoRA factors as one process does, keeping its slices (a base larger than one rank's
        memory fits)."""
        cfg, ft = self.cfg, self.ft
        # frozen LoRA bases need no fp32 master copy: bf16 under bf16 autocast (or with --param-dtype bf16)
        bf16 = cfg.param_dtype == "bf16" or (self.lora and self.autocast_dtype == torch.bfloat16)
        dtype = torch.bfloat16 if bf16 else torch.float32
        if self.distributed:
            model, base_weights = build_pretrained(ft.base, dtype=dtype, moe_impl=cfg.moe_impl)
        else:
            model, base_weights = load_pretrained(ft.base, dtype=dtype, device=self.device, moe_impl=cfg.moe_impl), None
        torch.manual_seed(cfg.seed)  # the head, LoRA factors, new MTP modules: the same draws on every rank
        if ft.task == "classify":
            model = classifier_from_base(model, self.labels)
        if self.lora:
            for p in model.parameters():
                p.requires_grad_(False)
            apply_lora(model, self.lora)
            for layer in model.moe_layers():
                layer.gate.weight.requires_grad_(True)  # the router trains in full unless frozen below
            if ft.task == "classify":
                model.score.weight.requires_grad_(True)
        if cfg.mtp_layers is not None:
            set_mtp_depth(model, cfg.mtp_layers)  # after the head and LoRA: the draws one process makes, in order
        frozen = {"router": lambda n: n.endswith("mlp.gate.weight"), "experts": lambda n: ".mlp.experts." in n,
                  "embeddings": lambda n: n.startswith(("embed_tokens.", "lm_head.")),
                  "main": lambda n: not n.startswith("mtp.")}
        for name, p in model.named_parameters():
            if any(frozen[f](name) for f in ft.freeze):
                p.requires_grad_(False)
        self.model_config = model.config
        prepare_and_parallelize(model, cfg, self.reducer, self.grad_accum)
        if base_weights is not None:
            model.to_empty(device=self.device)
            not_in_base = base_weights.fill(model)
            redraw_new_weights(model, cfg.seed, self.device, dtype, not_in_base)
        seed_per_rank(cfg.seed, self.reducer)
        return model

    def _checkpointed(self):
        return TrainedState(self.model)

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.ft.task == "lm":
            return super().evaluate()
        if not self.eval_examples:
            return None
        self.model.eval()
        # Rank r takes every world_size-th batch; a sharded model needs every rank in every forward, so a rank out
        # of batches runs one it does not count. Sums stay on the device; the host reads them once, at the end.
        classify = self.ft.task == "classify"
        batches = ftdata.eval_batches(self.eval_examples, self.cfg.micro_batch, self.pad_id) if classify else \
            [(None, b) for b in ftdata.packed_eval_batches(self.eval_examples, self.cfg.micro_batch, self.pad_id,
                                                           self.cfg.seq_len)]
        rank, world = self.reducer.rank, self.reducer.world_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        # each example's predicted class + 1 on the rank that ran it, 0 elsewhere: summed over ranks, all of them
        predicted = torch.zeros(len(self.eval_examples), dtype=torch.int64, device=self.device)
        for i in range(rank, -(-len(batches) // world) * world, world):
            counted = i < len(batches)
            order, batch = batches[i if counted else 0]
            batch = batch.to(self.device)
            with self._autocast():
                if classify:
                    logits = self.model.classify(batch.ids, batch.lengths).float()
                else:  # the training loss's chunked head: no (B, S, V) logits
                    mean, _ = next_token_loss(self.model, batch, main_only=True)
            if not counted:
                continue
            if classify:
                loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum")
                count += len(batch.labels)
                predicted[order] = logits.argmax(-1) + 1
            else:
                labelled = (batch.labels != ftdata.IGNORE).sum()
                loss_sum += mean.double() * labelled
                count += labelled
        self.model.train()
        loss_sum, count = self.reducer.sum(loss_sum).item(), int(self.reducer.sum(count))
        result = {"step": self.step, "val_loss": loss_sum / max(count, 1)}
        if self.ft.task == "classify":
            predictions = (self.reducer.sum(predicted) - 1).tolist()
            result.update(classification_scores(predictions, [e.labels for e in self.eval_examples], len(self.labels)))
        else:
            result["val_ppl"] = float(np.exp(min(result["val_loss"], 50.0)))
            result["val_tokens"] = count
        return result

    def _eval_line(self, result: dict) -> str:
        if self.ft.task == "lm":
            return super()._eval_line(result)
        head = f"step {self.step}/{self.total_steps}: val loss {result['val_loss']:.4f}"
        if self.ft.task == "classify":
            return (f"{head} | accuracy {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f} "
                    f"(majority class {result['majority_accuracy']:.4f})")
        return f"{head} (assistant tokens) | ppl {result['val_ppl']:.2f}"

    # ---- the result
    def _export(self) -> None:
        model, out = self.model, self.out
        if self.lora:
            extra = {}
            if self.ft.task == "classify":
                extra["score.weight"] = model.score.weight
            if "router" not in self.ft.freeze:  # trained router weights and aux-free biases
                for i, block in enumerate(model.layers):
                    if block.mlp.__class__.__name__ == "MoE":
                        extra[f"layers.{i}.mlp.gate.weight"] = block.mlp.gate.weight
                        if block.mlp.gate.e_score_correction_bias is not None:
                            extra[f"layers.{i}.mlp.gate.e_score_correction_bias"] = \
                                block.mlp.gate.e_score_correction_bias
            task_type = "SEQ_CLS" if self.ft.task == "classify" else "CAUSAL_LM"
            save_adapter(model, out / "adapter" if self.ft.merge else out, self.lora,
                         base_model=str(Path(self.ft.base).resolve()), task_type=task_type, modules_to_save=extra)
            if not self.ft.merge:
                return
            merge_lora(model)
        save_pretrained(model, out)  # a classifier's architectures and labels included

    def describe(self) -> str:
        c, cfg = self.model_config, self.cfg
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        mode = "full fine-tuning"
        if self.lora:
            mode = f"LoRA r={self.lora.rank} alpha={self.lora.alpha:g} on {', '.join(adapted_modules(self.model))}"
        frozen = f", frozen: {', '.join(self.ft.freeze)}" if self.ft.freeze else ""
        rows = f"rows of {cfg.seq_len} tokens (examples packed)" if self.ft.task == "sft" else \
            f"sequences of <= {cfg.seq_len} tokens"
        return (f"fine-tune {self.ft.base} ({c.model_type}, {c.num_params() / 1e6:.1f}M parameters) for "
                f"{self.ft.task}: "
                f"{mode}{frozen}; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train\n"
                f"data: {self.data.description}\n"
                + plan_line(self, f"{self.sequences_per_step} {rows}"))


class TrainedState:
    """A fine-tune's checkpoint: the tensors it trains (LoRA factors, head, router, unfrozen weights) and the
    buffers (aux-free router biases); the frozen weights are BASE's and are read from there again on resume, so a
    LoRA checkpoint of a 16B model is megabytes, not 32 GB."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config

    def parameters(self):
        return self.model.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        keep = trained | dict(self.model.named_buffers()).keys()
        return {k: v for k, v in self.model.state_dict().items() if k in keep}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict().keys()
        if state.keys() != expected:
            name = sorted(set(state) ^ set(expected))[0]
            raise UserError(f"the checkpoint does not fit this fine-tune ({name}); resume with the same options")
        self.model.load_state_dict(state, strict=False)


@torch.no_grad()
def redraw_new_weights(model: torch.nn.Module, seed: int, device: torch.device, dtype: torch.dtype,
                       names: list[str]) -> None:
    """The head, the LoRA factors and new MTP modules of a model sharded before it was filled, `names` (what BASE
    did not fill), with the values one process draws for them: the same seed, the same draws in the same order,
    whole on the same device; each rank keeps its slice (one tensor at a time: a rank never holds all of them
    whole)."""
    torch.manual_seed(seed)
    drawn = []
    if isinstance(model, SequenceClassifier):
        drawn.append(_keep_slice(model.score.weight, new_score(model.config, len(model.labels), device).weight))
    for _, delta in lora_factors(model):
        drawn += [_keep_slice(getattr(delta, name), full) for name, full in delta.new_factors(device).items()]
    for depth in sorted({int(n.split(".")[1]) for n in names if n.startswith("mtp.")}):
        fresh = new_mtp_module(model.config, depth, model.moe_impl, device, dtype)
        drawn += [_keep_slice(p, full) for p, full in zip(model.mtp[depth].parameters(), fresh.parameters())]
    params = dict(model.named_parameters())
    undrawn = [n for n in names if not any(params[n] is p for p in drawn)]
    if undrawn:
        raise RuntimeError(f"{undrawn[0]} is neither in the base checkpoint nor drawn by the fine-tune")


def _keep_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    local, offset = local_part(param)
    local.copy_(full[tuple(slice(start, start + size) for start, size in zip(offset, local.shape))])
    return param
