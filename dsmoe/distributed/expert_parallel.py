"""Expert parallelism: each rank of the EP group owns E / ep routed experts; tokens travel by all-to-all.

`apply_ep` replaces every MoE layer's `experts` module from outside with `ExpertParallelExperts`, which is
called exactly like `dsmoe.model.moe.Experts` (x_TD, topk_idx_TK, topk_weight_TK, impl, shared) -> y_TD, so
`MoE.forward` reads the same on one device and on many. Its weights keep the global names and shapes in the
state dict (DTensors sharded Shard(0) over the EP mesh), so checkpoints reshard between world sizes.

Experts are placed contiguously: rank r holds experts [r * E/ep, (r+1) * E/ep). A token is sent once to
every rank that holds at least one of its experts (not once per expert), and that rank returns one row:
the weighted sum over its own experts. So device-limited routing (group-limited routing whose groups are
the devices, DeepSeek-V2's M of D) bounds the traffic at M rows per token, as in the paper.

One forward, on every rank of the EP group (shape suffixes: R EP ranks, S send slots, P received slots, N expert
rows):
  1. the plan (ep_dispatch.py): which (token, rank) pair takes which send slot, and the split sizes; exact
     (variable splits read on the host, never drops) or, in training with a capacity factor, capacity-bounded
     (fixed splits, no host read, drops what overflows)
  2. all-to-all the pairs' hidden states and their [weights; local expert ids] (autograd-aware)
  3. local experts on the received (pair, own expert) rows (dsmoe.kernels.ops: the same kernels as one device)
  4. weighted sum per pair (fp32), all-to-all back, sum over ranks per token (fp32)
Backward runs the all-to-alls in reverse. Every rank takes part in every collective, also when it sends or
receives nothing. The shared experts run between 1 and 2, while the exact plan's counts travel.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.utils import parametrize

from dsmoe.distributed.ep_dispatch import ExactPlan, all_to_all, capacity_plan, slot_sources
from dsmoe.kernels import ops
from dsmoe.model.moe import Experts, MoE

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallelExperts(nn.Module):
    """Drop-in for `Experts` holding this rank's E / ep experts (see the module docstring).

    capacity_factor None: the exact dispatch (variable splits, one host read per forward, never drops).
    A number F: in training, the capacity-bounded dispatch (fixed splits, no host read; drops what overflows F
    times the balanced share, see ep_dispatch); evaluation stays exact. max_ranks_per_token: the most EP ranks
    one token can reach (the balanced share of token rows is T x that / ep). capacity_tokens: the most tokens
    one forward routes on any rank; the bounded buffers are sized from it, so that they agree on every rank
    when the ranks' micro-batches differ in length (None: from this forward's T, the same on every rank)."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh, capacity_factor: float | None = None,
                 max_ranks_per_token: int | None = None, capacity_tokens: int | None = None):
        super().__init__()
        self.ep_mesh = ep_mesh
        full = experts.gate_up_proj  # (computed once if parametrized: read before the weights become DTensors)
        self.num_experts = full.shape[0]
        self.ep = ep_mesh.size()
        self.local_experts = self.num_experts // self.ep
        self.capacity_factor = capacity_factor
        self.max_ranks_per_token = max_ranks_per_token or self.ep
        self.capacity_tokens = capacity_tokens
        # Every rank keeps its own slice of the weights it already holds (ranks built from one seed hold the
        # same full weights; a meta model has meta slices): no communication. The slice is copied so the
        # full tensor can be freed.
        for name in ("gate_up_proj", "down_proj"):
            if not parametrize.is_parametrized(experts, name):
                self.register_parameter(name, self._shard(getattr(experts, name), 0))
                continue
            # A LoRA adapter (dsmoe.finetune.lora): the frozen weight and the factors, each split over the experts
            # the same way, so each rank adds its own experts' deltas. The adapter module itself moves over.
            plist = experts.parametrizations[name]
            self.register_parameter(name, self._shard(plist.original, 0))
            for adapter in plist:
                for factor, dim in adapter.expert_dims.items():
                    setattr(adapter, factor, self._shard(getattr(adapter, factor), dim))
                parametrize.register_parametrization(self, name, adapter, unsafe=True)
        # The share of this rank's routing decisions (token, expert) that the last capacity-bounded forward
        # dropped, on the device (the trainer logs it as ep_dropped, see dropped_share).
        self.register_buffer("dropped_share", torch.zeros((), device=full.device), persistent=False)
        # Optional timing hook (the scale benchmark): a callable (nbytes) -> context manager, entered around
        # the dispatch all-to-all of the hidden states.
        self.dispatch_timer = None
        # Dispatch statistics of the last forward: the rows of the dispatch all-to-all to / from each EP rank
        # (host split sizes: the pairs on the exact plan, the capacity on the bounded one), the number of ranks
        # each token reached (tests and benchmarks read them).
        self.last_send_pairs: list[int] = []
        self.last_recv_pairs: list[int] = []
        self.last_ranks_per_token: torch.Tensor | None = None

    def _shard(self, weight: torch.Tensor, dim: int) -> nn.Parameter:
        """This rank's contiguous block of experts along `dim`, as a DTensor of the global shape."""
        local = weight.detach().chunk(self.ep, dim=dim)[self.ep_mesh.get_local_rank()].clone()
        sharded = DTensor.from_local(local, self.ep_mesh, [Shard(dim)], run_check=False)
        return nn.Parameter(sharded, requires_grad=weight.requires_grad)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)
        self.dropped_share.zero_()

    @property
    def bounded(self) -> bool:
        """Whether a forward now takes the capacity-bounded dispatch (training with a capacity factor)."""
        return self.capacity_factor is not None and self.training

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                impl: str, shared: nn.Module | None = None, active_TK: torch.Tensor | None = None) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        D = x_TD.shape[1]
        R, L = self.ep, self.local_experts
        group = self.ep_mesh.get_group()

        # 1. token-rank pairs (the expert rows each token has on each rank) and their send slots
        dest_TK = topk_idx_TK // L
        rows_TR = torch.zeros(T, R, dtype=torch.int64, device=x_TD.device)
        # padding and unused adaptive slots do not travel: they would take real tokens' places in the capacity
        counted_TK = torch.ones_like(dest_TK) if active_TK is None else active_TK.long()
        rows_TR.scatter_add_(1, dest_TK, counted_TK)
        self.last_ranks_per_token = (rows_TR > 0).sum(1).detach()
        if self.bounded:
            budget = self.capacity_tokens or T
            if T > budget:
                raise ValueError(f"a micro-batch of {T} tokens is more than the {budget} the expert-parallel "
                                 "capacity was sized for")
            plan = capacity_plan(rows_TR.t(), K, L, self.capacity_factor, self.max_ranks_per_token, budget,
                                 counted_TK.sum())
            self.dropped_share.copy_(plan.dropped_share)
        else:
            plan = ExactPlan(rows_TR.t(), group)
        shared_TD = shared(x_TD) if shared is not None else None  # runs while the exact plan's counts travel
        send, recv, n_rows = plan.split_sizes()  # the exact plan reads them on the host here
        self.last_send_pairs, self.last_recv_pairs = send, recv

        pair_S, filled_S = slot_sources(plan.slot_RT.flatten(), sum(send))  # rank-major: r * T + t
        pair_rank_S, pair_token_S = pair_S // T, pair_S % T
        on_rank_SK = (dest_TK[pair_token_S] == pair_rank_S[:, None]) & filled_S[:, None]
        if active_TK is not None:
            on_rank_SK &= active_TK.index_select(0, pair_token_S)
        weight_SK = torch.where(on_rank_SK, topk_weight_TK.index_select(0, pair_token_S).float(), 0.0)
        local_idx_SK = torch.where(on_rank_SK, topk_idx_TK[pair_token_S] % L, -1).float()  # -1: not here

        # 2. dispatch (weights travel with their ids in one fp32 tensor; ids < 2^24 are exact)
        x_send = x_TD.index_select(0, pair_token_S)  # (backward: index_add, no host sync)
        timer = self.dispatch_timer(x_send.numel() * x_send.element_size()) if self.dispatch_timer else nullcontext()
        with timer:
            x_recv = all_to_all(x_send, recv, send, group)
        meta_recv = all_to_all(torch.cat([weight_SK, local_idx_SK], dim=1), recv, send, group)

        # 3. this rank's experts on every (received pair, own expert) row, weighted in fp32
        y_pair = self._local_experts(x_recv, meta_recv, K, n_rows, impl)

        # 4. combine: back to the source ranks, then the sum over ranks per token (unfilled slots: row T, cut)
        y_back = all_to_all(y_pair, send, recv, group)
        y_TD = torch.zeros(T + 1, D, dtype=torch.float32, device=x_TD.device)
        y_TD = y_TD.index_add(0, torch.where(filled_S, pair_token_S, T), y_back.float())[:T].to(x_TD.dtype)
        return y_TD if shared_TD is None else y_TD + shared_TD

    def _local_experts(self, x_recv: torch.Tensor, meta_recv: torch.Tensor, K: int, n_rows: int,
                       impl: str) -> torch.Tensor:
        """n_rows: the rows to compute, the exact count or the capacity (unfilled rows compute with weight 0
        into a row that is cut)."""
        P, D = x_recv.shape
        weight_flat = meta_recv[:, :K].flatten()
        idx_flat = meta_recv[:, K:].detach().flatten().long()
        here = idx_flat >= 0
        row_N, filled_N = slot_sources(torch.where(here, here.cumsum(0) - 1, -1), n_rows)
        pair_N = row_N // K
        x_rows = x_recv.index_select(0, pair_N)
        w_rows = torch.where(filled_N, weight_flat.index_select(0, row_N), 0.0)
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        if n_rows == 0:
            # Nothing for this rank's experts. The output still depends on everything received and on the
            # weights, so backward runs the same all-to-alls on every rank and the weights get a (zero)
            # gradient, which keeps FSDP's reduce-scatter identical across ranks.
            tie = x_rows.sum() + w_rows.sum() + gate_up.sum() + down.sum()
            return x_recv.new_zeros(P, D) + (tie * 0).to(x_recv.dtype)
        spread = torch.arange(n_rows, device=idx_flat.device) % self.local_experts
        idx_rows = torch.where(filled_N, idx_flat[row_N], spread)  # unfilled rows over every expert, not one
        y_rows = ops.moe_experts(x_rows, idx_rows[:, None], w_rows[:, None], gate_up, down, impl)
        y_pair = torch.zeros(P + 1, D, dtype=torch.float32, device=x_recv.device)
        y_pair = y_pair.index_add(0, torch.where(filled_N, pair_N, P), y_rows.float())[:P]
        return y_pair.to(x_recv.dtype)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh, capacity_factor: float | None = None,
             capacity_tokens: int | None = None) -> None:
    """Give every MoE layer expert-parallel experts over `ep_mesh`, and tell the layer its real
    expert-to-device layout (the device-level and communication balance losses use it). capacity_factor,
    capacity_tokens: see ExpertParallelExperts (None: the exact dispatch)."""
    if capacity_factor is not None and capacity_tokens is None:
        raise ValueError("the capacity-bounded dispatch needs capacity_tokens (the most tokens a rank routes per "
                         "forward): every rank must size its all-to-all buffers the same")
    ep = ep_mesh.size()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        E = moe.config.n_routed_experts
        if E % ep:
            raise ValueError(f"ep={ep} does not divide the {E} routed experts")
        moe.experts_per_device = E // ep
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh, capacity_factor, moe.max_devices_per_token(),
                                            capacity_tokens)
    if moes and (not dist.is_initialized() or dist.get_rank() == 0):
        c = moes[0].config
        limited = c.topk_method != "greedy" and c.n_group > 1
        log.info("expert parallel: %d experts per rank over %d ranks; a token reaches at most %d ranks%s; %s",
                 c.n_routed_experts // ep, ep, moes[0].max_devices_per_token(),
                 f" (group-limited routing: {c.topk_group} of {c.n_group} groups)" if limited else "",
                 "exact dispatch (variable splits)" if capacity_factor is None else
                 f"sync-free dispatch in training, capacity factor {capacity_factor:g}")
        if limited and c.n_group % ep and ep % c.n_group:
            log.warning("the %d routing groups straddle the %d EP ranks, so group-limited routing bounds the "
                        "ranks per token only loosely: choose --ep dividing or divided by n_group=%d",
                        c.n_group, ep, c.n_group)


def ep_layers(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def dropped_share(layers: list[ExpertParallelExperts]) -> torch.Tensor:
    """The share of this rank's routing decisions that the last training forward dropped, over the given layers,
    on the device (0 from a layer with the exact dispatch)."""
    return torch.stack([m.dropped_share if m.capacity_factor is not None else torch.zeros_like(m.dropped_share)
                        for m in layers]).mean()
