"""One pass over a text sample that scores it (the loss of `dsmoe eval`) and, through forward hooks, collects
every routing statistic `dsmoe analyze` reports, on the device, in whole-batch tensor operations.

Hooks read what the model already computes: the input ids (a pre-hook on the model), each router's `Routing`
(the counts that `Transformer.routing_stats()` reports, the top-k ids, the affinities), and the outputs of the
routed and the shared experts. Each forward of the pass holds windows of one domain (one input file), so a
domain is a number set between forwards, not a per-token label.

Shape suffixes: L MoE layers, E routed experts, D domains, V vocabulary, T tokens of one forward, K experts
per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from dsmoe.model.balance import affinity_probs
from dsmoe.model.transformer import Transformer
from dsmoe.tasks.perplexity import evaluate_loss


@dataclass
class RoutingTotals:
    """Sums over the sample (numpy, on the CPU)."""

    counts_LE: np.ndarray  # routings (token, expert) per expert: the sum of routing_stats() counts
    domain_counts_LDE: np.ndarray  # the same split by the domain of the token
    coactivation_LEE: np.ndarray  # tokens that chose both expert i and expert j (diagonal: tokens that chose i)
    entropy_sum_L: np.ndarray  # sum over tokens of the entropy (nats) of the routing distribution
    token_expert_LEV: torch.Tensor  # routings of each vocabulary entry to each expert (kept on the device)
    routed_norm_L: np.ndarray  # sum over tokens of |routed experts' output|
    shared_norm_L: np.ndarray  # sum over tokens of |shared experts' output| (0 without shared experts)
    experts_per_token_LK: np.ndarray  # tokens that used k routed experts, k = 0..K (adaptive routing varies k)
    token_counts_V: np.ndarray  # occurrences of each vocabulary entry in the sample
    tokens: int  # tokens routed per MoE layer
    domain_loss: list[float]  # mean next-token loss of each domain's windows (evaluate_loss)
    domain_tokens: list[int]  # predicted tokens of each domain


class RoutingCollector:
    """Context manager: hooks installed on enter, removed on exit; `domain` says whose windows come next."""

    def __init__(self, model: Transformer, num_domains: int):
        self.model, self.moes = model, model.moe_layers()
        if not self.moes:
            raise ValueError("the model has no MoE layer")
        c = model.config
        L, E, D, V = len(self.moes), c.n_routed_experts, num_domains, c.vocab_size
        device = model.embed_tokens.weight.device
        zeros = partial(torch.zeros, device=device, dtype=torch.float64)
        self.counts_LE = torch.zeros(L, E, dtype=torch.int64, device=device)
        self.domain_counts_LDE = torch.zeros(L, D, E, dtype=torch.int64, device=device)
        self.coactivation_LEE = zeros(L, E, E)
        self.entropy_sum_L, self.routed_norm_L, self.shared_norm_L = zeros(L), zeros(L), zeros(L)
        # int32: the V2-Lite-sized table (26 x 64 x 102400) is 0.7 GB this way
        self.token_expert_LEV = torch.zeros(L, E, V, dtype=torch.int32, device=device)
        self.experts_per_token_LK = torch.zeros(L, c.num_experts_per_tok + 1, dtype=torch.int64, device=device)
        self.token_counts_V = torch.zeros(V, dtype=torch.int64, device=device)
        self.tokens = 0
        self.domain = 0
        self._ids_T: torch.Tensor | None = None
        self._shared_out: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingCollector:
        self._handles.append(self.model.register_forward_pre_hook(self._on_input))
        for layer, moe in enumerate(self.moes):
            self._handles.append(moe.gate.register_forward_hook(partial(self._on_routing, layer)))
            self._handles.append(moe.experts.register_forward_hook(partial(self._on_routed, layer)))
            if moe.shared_experts is not None:
                self._handles.append(moe.shared_experts.register_forward_hook(partial(self._on_shared, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_input(self, module, args) -> None:
        self._ids_T = args[0].reshape(-1)
        self.tokens += self._ids_T.numel()
        self.token_counts_V.scatter_add_(0, self._ids_T, torch.ones_like(self._ids_T))

    @torch.no_grad()
    def _on_routing(self, layer: int, module, args, routing) -> None:
        idx_TK = routing.topk_idx_TK
        T, E = routing.scores_TE.shape
        self.counts_LE[layer] += routing.counts_E
        self.domain_counts_LDE[layer, self.domain] += routing.counts_E
        # adaptive routing: only the slots a token uses count (as in counts_E)
        used_TK = torch.ones_like(idx_TK, dtype=torch.float32) if routing.active_TK is None else \
            routing.active_TK.float()
        chosen_TE = torch.zeros(T, E, device=idx_TK.device).scatter_(1, idx_TK, used_TK)
        self.coactivation_LEE[layer] += (chosen_TE.t() @ chosen_TE).double()  # exact: entries <= T < 2^24
        probs = affinity_probs(routing.scores_TE, module.config.scoring_func).float()
        self.entropy_sum_L[layer] -= torch.special.xlogy(probs, probs).sum().double()
        V = self.token_expert_LEV.shape[2]
        flat = (idx_TK * V + self._ids_T[:, None]).flatten()
        self.token_expert_LEV[layer].view(-1).scatter_add_(0, flat, used_TK.flatten().to(torch.int32))
        k_T = used_TK.sum(dim=1).long()
        self.experts_per_token_LK[layer].scatter_add_(0, k_T, torch.ones_like(k_T))

    @staticmethod
    def _norm_sum(y: torch.Tensor) -> torch.Tensor:
        return y.float().reshape(-1, y.shape[-1]).norm(dim=-1).sum().double()

    @torch.no_grad()
    def _on_shared(self, layer: int, module, args, output) -> None:
        self.shared_norm_L[layer] += self._norm_sum(output)
        self._shared_out[layer] = output

    @torch.no_grad()
    def _on_routed(self, layer: int, module, args, output) -> None:
        # the experts module adds the shared experts' output (run inside its forward, so seen just before)
        shared = self._shared_out.pop(layer, None)
        self.routed_norm_L[layer] += self._norm_sum(output if shared is None else output - shared)


def collect_routing(model: Transformer, windows_by_domain: list[list[np.ndarray]], *, batch_size: int,
                    device: torch.device, autocast_dtype: torch.dtype | None = None,
                    drafts: bool = False) -> RoutingTotals:
    """Score each domain's windows with `evaluate_loss` (the numbers `dsmoe eval` prints) while the hooks sum
    the routing statistics; drafts: run the MTP modules too, so that their MoE layers are counted (the loss
    stays the main model's)."""
    losses, counts = [], []
    with RoutingCollector(model, len(windows_by_domain)) as c:
        for domain, windows in enumerate(windows_by_domain):
            c.domain = domain
            loss, n = evaluate_loss(model, windows, batch_size=batch_size, device=device,
                                    autocast_dtype=autocast_dtype, drafts=drafts)
            losses.append(loss)
            counts.append(n)
    cpu = lambda t: t.cpu().numpy()
    return RoutingTotals(cpu(c.counts_LE), cpu(c.domain_counts_LDE), cpu(c.coactivation_LEE), cpu(c.entropy_sum_L),
                         c.token_expert_LEV, cpu(c.routed_norm_L), cpu(c.shared_norm_L),
                         cpu(c.experts_per_token_LK), cpu(c.token_counts_V), c.tokens, losses, counts)

