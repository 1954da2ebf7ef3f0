"""Expert parallelism: each rank of the EP group owns E / ep routed experts; tokens travel by all-to-all.

`apply_ep` replaces every MoE layer's `experts` module from outside with `ExpertParallelExperts`, which is
called exactly like `dsmoe.model.moe.Experts` (x_TD, topk_idx_TK, topk_weight_TK) -> y_TD, so `MoE.forward`
reads the same on one device and on many. Its weights keep the global names and shapes in the state dict
(DTensors sharded Shard(0) over the EP mesh), so checkpoints reshard between world sizes.

Experts are placed contiguously: rank r holds experts [r * E/ep, (r+1) * E/ep). A token is sent once to
every rank that holds at least one of its experts (not once per expert), and that rank returns one row:
the weighted sum over its own experts. So device-limited routing (group-limited routing whose groups are
the devices, DeepSeek-V2's M of D) bounds the traffic at M rows per token, as in the paper.

One forward, on every rank of the EP group (P = token-rank pairs, shape suffix R = EP ranks):
  1. pairs (token, rank) for every rank a token reaches, ordered by rank; counts exchanged by all-to-all,
     then read on the host once (the variable split sizes of the next all-to-alls)
  2. all-to-all the pairs' hidden states and their [weights; local expert ids] (autograd-aware)
  3. local experts on the received rows (dsmoe.kernels.ops: the same kernels as one device)
  4. weighted sum per pair (fp32), all-to-all back, sum over ranks per token (fp32)
Backward runs the all-to-alls in reverse. Every rank takes part in every collective, also when it sends or
receives nothing.
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

from dsmoe.kernels import ops
from dsmoe.model.moe import Experts, MoE

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends the gradients back the way the rows came.
    (Public c10d API, so it behaves the same on every torch version, on gloo and on NCCL.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; out_splits[r] rows arrive from rank r."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _first_true(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first n True entries of a flat bool mask, in order; n is already known on the host,
    so unlike nonzero() this does not synchronise with the device."""
    return torch.sort(mask.logical_not().to(torch.uint8), stable=True).indices[:n]


class ExpertParallelExperts(nn.Module):
    """Drop-in for `Experts` holding this rank's E / ep experts (see the module docstring)."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        self.ep_mesh = ep_mesh
        self.num_experts = experts.gate_up_proj.shape[0]
        self.ep = ep_mesh.size()
        self.local_experts = self.num_experts // self.ep
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
        # Optional timing hook (the scale benchmark): a callable (nbytes) -> context manager, entered around
        # the dispatch all-to-all of the hidden states.
        self.dispatch_timer = None
        # Dispatch statistics of the last forward: rows sent to / received from each EP rank, the number of
        # ranks each token reached (tests and benchmarks read them).
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

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                impl: str) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        D = x_TD.shape[1]
        R, L = self.ep, self.local_experts
        group = self.ep_mesh.get_group()

        # 1. token-rank pairs, and how many pairs / expert rows go to each rank
        dest_TK = topk_idx_TK // L
        reach_TR = torch.zeros(T, R, dtype=torch.bool, device=x_TD.device).scatter_(1, dest_TK, True)
        rows_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
        rows_E.scatter_add_(0, topk_idx_TK.flatten(), torch.ones_like(topk_idx_TK.flatten()))
        send_counts = torch.cat([reach_TR.sum(0, dtype=torch.int64)[:, None], rows_E.view(R, L)], dim=1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        host = torch.cat([send_counts[:, 0], recv_counts[:, 0], recv_counts[:, 1:].sum().view(1)]).tolist()
        send_pairs, recv_pairs, recv_rows = host[:R], host[R:2 * R], host[2 * R]
        self.last_send_pairs, self.last_recv_pairs = send_pairs, recv_pairs
        self.last_ranks_per_token = reach_TR.sum(1).detach()

        pair_P = _first_true(reach_TR.t().flatten(), sum(send_pairs))  # rank-major: r * T + t
        pair_rank_P, pair_token_P = pair_P // T, pair_P % T
        idx_PK = topk_idx_TK[pair_token_P]
        on_rank_PK = dest_TK[pair_token_P] == pair_rank_P[:, None]
        weight_PK = torch.where(on_rank_PK, topk_weight_TK[pair_token_P].float(), 0.0)
        local_idx_PK = torch.where(on_rank_PK, idx_PK % L, -1).float()  # -1: that expert lives elsewhere

        # 2. dispatch (weights travel with their ids in one fp32 tensor; ids < 2^24 are exact)
        x_send = x_TD[pair_token_P]
        timer = self.dispatch_timer(x_send.numel() * x_send.element_size()) if self.dispatch_timer else nullcontext()
        with timer:
            x_recv = all_to_all(x_send, recv_pairs, send_pairs, group)
        meta_recv = all_to_all(torch.cat([weight_PK, local_idx_PK], dim=1), recv_pairs, send_pairs, group)

        # 3. this rank's experts on every (received pair, own expert) row, weighted in fp32
        y_pair = self._local_experts(x_recv, meta_recv, K, recv_rows, impl)

        # 4. combine: back to the source ranks, then the sum over ranks per token
        y_back = all_to_all(y_pair, send_pairs, recv_pairs, group)
        y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
        return y_TD.index_add(0, pair_token_P, y_back.float()).to(x_TD.dtype)

    def _local_experts(self, x_recv: torch.Tensor, meta_recv: torch.Tensor, K: int, n_rows: int,
                       impl: str) -> torch.Tensor:
        P, D = x_recv.shape
        weight_flat = meta_recv[:, :K].flatten()
        idx_flat = meta_recv[:, K:].detach().flatten().long()
        row_N = _first_true(idx_flat >= 0, n_rows)
        pair_N = row_N // K
        x_rows, w_rows = x_recv[pair_N], weight_flat[row_N]
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        if n_rows == 0:
            # Nothing for this rank's experts. The output still depends on everything received and on the
            # weights, so backward runs the same all-to-alls on every rank and the weights get a (zero)
            # gradient, which keeps FSDP's reduce-scatter identical across ranks.
            tie = x_rows.sum() + w_rows.sum() + gate_up.sum() + down.sum()
            return x_recv.new_zeros(P, D) + (tie * 0).to(x_recv.dtype)
        y_rows = ops.moe_experts(x_rows, idx_flat[row_N][:, None], w_rows[:, None], gate_up, down, impl)
        y_pair = torch.zeros(P, D, dtype=torch.float32, device=x_recv.device)
        return y_pair.index_add(0, pair_N, y_rows.float()).to(x_recv.dtype)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Give every MoE layer expert-parallel experts over `ep_mesh`, and tell the layer its real
    expert-to-device layout (the device-level and communication balance losses use it)."""
    ep = ep_mesh.size()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        E = moe.config.n_routed_experts
        if E % ep:
            raise ValueError(f"ep={ep} does not divide the {E} routed experts")
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
        moe.experts_per_device = E // ep
    if moes and (not dist.is_initialized() or dist.get_rank() == 0):
        c = moes[0].config
        limited = c.topk_method != "greedy" and c.n_group > 1
        log.info("expert parallel: %d experts per rank over %d ranks; a token reaches at most %d ranks%s",
                 c.n_routed_experts // ep, ep, moes[0].max_devices_per_token(),
                 f" (group-limited routing: {c.topk_group} of {c.n_group} groups)" if limited else "")
        if limited and c.n_group % ep and ep % c.n_group:
            log.warning("the %d routing groups straddle the %d EP ranks, so group-limited routing bounds the "
                        "ranks per token only loosely: choose --ep dividing or divided by n_group=%d",
                        c.n_group, ep, c.n_group)
