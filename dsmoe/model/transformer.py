"""The decoder: embedding -> blocks [attention -> dense MLP or MoE] -> norm -> lm_head.

Parameter names follow the Hugging Face checkpoints without the leading "model." (layers.{i}.self_attn...,
layers.{i}.mlp.gate.weight), except the routed experts, which are stacked (layers.{i}.mlp.experts.
gate_up_proj / down_proj); checkpoint/hf.py maps both ways.

Construction on the meta device is supported: build under `torch.device("meta")`, then `to_empty(device=)`
and `init_weights()` (or let `load_pretrained` fill the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.model.attention import build_attention
from dsmoe.model.balance import update_bias
from dsmoe.model.layers import MLP, RMSNorm, RotaryEmbedding
from dsmoe.model.moe import MoE
from dsmoe.model.packed_attention import PackedLayout


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, moe_impl: str):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, moe_impl) if config.is_moe_layer(layer_id) else \
            MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                token_mask: torch.Tensor | None = None, packing: PackedLayout | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, packing)
        h_norm = self.post_attention_layernorm(h)
        segment_ids = None if packing is None else packing.segment_ids
        return h + (self.mlp(h_norm, token_mask, segment_ids) if isinstance(self.mlp, MoE) else self.mlp(h_norm))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, moe_impl: str = "auto"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i, moe_impl) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        from dsmoe.model.mtp import MTPModule  # here: mtp.py builds on Block, defined above

        self.mtp = nn.ModuleList(MTPModule(config, k, moe_impl) for k in range(config.num_nextn_predict_layers))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
        last_only: bool = False, return_hidden: bool = False, with_mtp: bool = False,
        token_mask: torch.Tensor | None = None, packing: PackedLayout | None = None,
    ):
        """input_ids (B, S) -> logits (B, S, V) (or (B, 1, V) with last_only; the final-normed hidden
        states (B, S, D) with return_hidden). positions default to 0..S-1; a cache (one entry per layer)
        is given by the inference engine. with_mtp (training): (logits, [logits of MTP depth k, (B, S, V)
        for k = 1..D]); depth k's logits at position t predict token t+k+1 (see mtp.py). token_mask (B, S)
        bool marks the real tokens of a padded batch: the MoE statistics count only those (moe.py). packing
        (packed rows of several examples, positions restarting per example): attention stays within an example
        (packed_attention.py)."""
        B, S = input_ids.shape
        if positions is None:
            positions = torch.arange(S, device=input_ids.device)
        cos, sin = self.rotary(positions)
        packing = None if packing is None else packing.for_forward()
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if cache is None else cache[i], token_mask, packing)
        h = self.norm(h[:, -1:] if last_only else h)
        if with_mtp:
            return self.logits(h), self.mtp_logits(h, input_ids, cos, sin, token_mask, packing)
        return h if return_hidden else self.logits(h)

    def mtp_logits(self, h: torch.Tensor, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   token_mask: torch.Tensor | None = None,
                   packing: PackedLayout | None = None) -> list[torch.Tensor]:
        """The MTP modules over a whole sequence (training): h (B, S, D) the main model's final-normed
        hidden states -> one (B, S, V) logits tensor per depth."""
        from dsmoe.model.mtp import same_segment_ahead, shifted_inputs

        out = []
        for k, module in enumerate(self.mtp, 1):
            real = None if token_mask is None else shifted_inputs(token_mask, k)  # False past the end
            if packing is not None:  # and where the token k ahead belongs to the next packed example
                same = same_segment_ahead(packing.segment_ids, k)
                real = same if real is None else real & same
            h = module(h, self.embed_tokens(shifted_inputs(input_ids, k)), cos, sin, token_mask=real,
                       packing=packing)
            out.append(self.logits(module.shared_head.norm(h)))
        return out

    def blocks(self) -> list[Block]:
        """Every decoder block, the MTP modules' included: what activation checkpointing, compile and FSDP wrap."""
        return [*self.layers, *self.mtp]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return h @ weight.t()

    # ---- initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """Every weight ~ N(0, initializer_range) (0.006, the papers' value), norms 1, biases 0."""
        init_module_weights(self, self.config.initializer_range)
        self.rotary.reset_parameters()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary frequencies, routing statistics), e.g. after `to_empty`."""
        self.rotary.reset_parameters()
        for moe in self.moe_layers():
            moe.reset_statistics()

    # ---- MoE statistics and the aux-loss-free bias update
    def moe_layers(self) -> list[MoE]:
        """The MoE layers, main model first, then the MTP modules' (config.moe_layer_ids in the same order)."""
        return [block.mlp for block in self.blocks() if isinstance(block.mlp, MoE)]

    def routing_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert counts [L_moe, E] of the last forward, summed balance loss of the last forward)."""
        moes = self.moe_layers()
        if not moes:
            return torch.zeros(0, 0, dtype=torch.int64), torch.zeros(())
        return torch.stack([m.expert_counts for m in moes]), torch.stack([m.aux_loss for m in moes]).sum()

    def routed_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(routing decisions used per main-model MoE layer, real tokens routed) in the last forward of an
        adaptive-routing model (routing_top_p): their ratio is the routed experts per token (fixed top-k keeps it
        at num_experts_per_tok and does not count the tokens)."""
        main = self.moe_layers()[:len(self.config.main_moe_layer_ids)]  # the main model's come first
        used = torch.stack([m.expert_counts.sum() for m in main]).float().mean()
        return used, main[0].routed_tokens.float()

    def set_aux_loss_scale(self, scale: float) -> None:
        for moe in self.moe_layers():
            moe.aux_loss_scale = scale

    @property
    def moe_impl(self) -> str:
        """The routed experts' implementation the MoE layers ask for ("auto" for a model without any), what a
        module added to this model (MTP depth, classifier, surgery's copy) should ask for too."""
        moes = self.moe_layers()
        return moes[0].impl if moes else "auto"

    @moe_impl.setter
    def moe_impl(self, impl: str) -> None:
        for moe in self.moe_layers():
            moe.impl = impl

    @torch.no_grad()
    def update_expert_bias(self, counts_LE: torch.Tensor, gamma: float) -> None:
        """b += gamma * sign(mean(c) - c) per MoE layer from one optimizer step's counts (noaux_tc only). A frozen
        router (a fine-tune's --freeze router or main) keeps its bias too."""
        for moe, counts in zip(self.moe_layers(), counts_LE):
            if moe.gate.e_score_correction_bias is not None and moe.gate.weight.requires_grad:
                update_bias(moe.gate.e_score_correction_bias, counts, gamma)


@torch.no_grad()
def init_module_weights(root: nn.Module, std: float) -> None:
    """Linear and embedding weights of `root` ~ N(0, std), MoE layers by their own rule, norms 1."""
    moes = [m for m in root.modules() if isinstance(m, MoE)]
    in_moe = {id(m) for moe in moes for m in moe.modules() if m is not moe}
    for module in root.modules():
        if isinstance(module, MoE):
            module.reset_parameters(std)  # all of the layer (its shared experts too), once
        elif isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in in_moe:
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                moe_impl: str = "auto") -> Transformer:
    """Build on the meta device, materialise on `device`, initialise. Router weights stay fp32."""
    with torch.device("meta"):
        model = Transformer(config, moe_impl)
    model.to_empty(device=device)
    model.init_weights()
    if dtype is not None:
        cast_model(model, dtype)
    return model


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast parameters to `dtype` except the router (weight and bias stay fp32, as transformers keeps them)."""
    for name, p in model.named_parameters():
        if not name.endswith("mlp.gate.weight"):
            p.data = p.data.to(dtype)
    return model
