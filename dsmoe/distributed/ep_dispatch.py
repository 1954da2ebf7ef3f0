"""The expert-parallel dispatch plans: which (token, rank) pair takes which slot of the all-to-all, and the split
sizes. Shape suffixes: R EP ranks, T tokens, K experts per token, L experts per rank.

ExactPlan: every pair travels, packed rank by rank (variable splits). The split sizes must reach the host (the
all-to-all takes them as lists), so the per-rank counts are exchanged by an async all-to-all and read when
`split_sizes()` is called: whatever the caller enqueues in between (the shared experts) runs while they travel.
One host read per forward; never drops.

CapacityPlan: fixed splits, no host read: to each rank at most C_pairs token rows carrying at most C_rows expert
rows, both F times the balanced share (T * M / R pairs and T * K / R rows, M = the most ranks one token reaches),
capped at T and T * min(K, L), the bounds that never drop (T: the most tokens a rank routes per forward, the same
number on every rank so that the buffers agree). Every shape follows from T, so the step can be captured
in a CUDA graph. Pairs beyond either capacity are dropped first come, first served (in token order, as GShard and
Switch drop): the token loses that rank's experts and keeps its other ranks', its shared experts and the residual.
The receiving rank computes R * C_rows expert rows, the unfilled ones with weight 0: the capacity is paid in padded
compute and traffic. Every rank sizes its buffers for the same token count (the trainer's micro-batch), so they
agree even when the ranks route different numbers of tokens. Only the decisions that count take capacity:
padding and adaptive routing's unused slots never travel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def slot_sources(slot: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of a placement: entry i of the flat `slot` goes to slot[i] (-1: nowhere; placed entries take
    distinct slots < n). -> (the entry in each of the n slots, 0 where none; whether the slot is filled).
    One scatter on the device: unlike nonzero(), no host sync."""
    src = torch.full((n + 1,), -1, dtype=torch.int64, device=slot.device)  # slot n: where the unplaced land
    src.scatter_(0, torch.where(slot >= 0, slot, n), torch.arange(slot.numel(), device=slot.device))
    src = src[:n]
    filled = src >= 0
    return src.clamp(min=0), filled


class ExactPlan:
    """Every pair, packed rank-major (slot = pairs to lower ranks + the pair's place among those to its rank).
    rows_RT: the expert rows each token has on each rank (0: the pair does not exist)."""

    def __init__(self, rows_RT: torch.Tensor, group):
        reach_RT = rows_RT > 0
        R, T = reach_RT.shape
        self.slot_RT = torch.where(reach_RT, reach_RT.flatten().cumsum(0).view(R, T) - 1, -1)
        self.send_counts = torch.stack([reach_RT.sum(1), rows_RT.sum(1)], dim=1)  # [R, (pairs, expert rows)]
        self.recv_counts = torch.empty_like(self.send_counts)
        self.work = dist.all_to_all_single(self.recv_counts, self.send_counts, group=group, async_op=True)

    def split_sizes(self) -> tuple[list[int], list[int], int]:
        """(pairs sent to each rank, pairs received from each rank, expert rows received): waits for the
        exchange and reads it on the host, once."""
        self.work.wait()
        R = self.send_counts.shape[0]
        host = torch.cat([self.send_counts[:, 0], self.recv_counts[:, 0], self.recv_counts[:, 1].sum().view(1)])
        host = host.tolist()
        return host[:R], host[R:2 * R], host[2 * R]


def capacities(tokens: int, top_k: int, ranks: int, local_experts: int, factor: float,
               max_ranks_per_token: int) -> tuple[int, int]:
    """(C_pairs, C_rows): token rows and expert rows one rank sends to each rank, `factor` times the balanced
    share, capped at the bounds that never drop (a token goes to a rank once, with at most min(K, L) experts);
    at least 1 (every rank sends something fixed), and C_pairs <= C_rows (a pair carries at least one row)."""
    rows = min(tokens * min(top_k, local_experts), math.ceil(factor * tokens * top_k / ranks))
    pairs = min(tokens, math.ceil(factor * tokens * min(max_ranks_per_token, ranks) / ranks), rows)
    return max(1, pairs), max(1, rows)


@dataclass
class CapacityPlan:
    slot_RT: torch.Tensor  # send slot of each (rank, token) pair, r * C_pairs + its place; -1: absent or dropped
    pairs: int  # C_pairs
    rows: int  # C_rows
    dropped_share: torch.Tensor  # of the routing decisions that count, on the device

    def split_sizes(self) -> tuple[list[int], list[int], int]:
        """(rows sent to each rank, rows received from each rank, expert rows to compute): constants."""
        R = self.slot_RT.shape[0]
        return [self.pairs] * R, [self.pairs] * R, R * self.rows


def capacity_plan(rows_RT: torch.Tensor, top_k: int, local_experts: int, factor: float,
                  max_ranks_per_token: int, budget_tokens: int, decisions: torch.Tensor) -> CapacityPlan:
    """budget_tokens (>= T): the token count the capacities are sized for; decisions: how many routing decisions
    count (rows_RT counts only those), the denominator of the dropped share. The pairs each rank keeps are a
    prefix in token order (both running counts only grow), so a kept pair's place among the pairs to its rank is
    its place among the kept ones."""
    R, T = rows_RT.shape
    pairs, rows = capacities(budget_tokens, top_k, R, local_experts, factor, max_ranks_per_token)
    reach_RT = rows_RT > 0
    place_RT = reach_RT.cumsum(1)  # 1-based place among the pairs to that rank
    keep_RT = reach_RT & (place_RT <= pairs) & (rows_RT.cumsum(1) <= rows)
    first = torch.arange(R, device=rows_RT.device)[:, None] * pairs
    slot_RT = torch.where(keep_RT, first + place_RT - 1, -1)
    kept_rows = (rows_RT * keep_RT).sum()
    return CapacityPlan(slot_RT, pairs, rows, 1.0 - kept_rows.float() / decisions.clamp(min=1).float())
