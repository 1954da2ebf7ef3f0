"""LoRA: W' = W + (alpha / r) * B @ A on dense projections and, per expert, on the stacked routed experts.

Each adapted weight gets a `LoRADelta` parametrization (torch.nn.utils.parametrize): reading the weight gives
W + delta, so every consumer of the weight is unchanged - nn.Linear, and the routed experts through
`kernels.ops.moe_experts` on whichever path runs (reference, grouped, Triton). For the stacked experts
[E, out, in] the delta of all E experts is one batched GEMM (E x [out, r] @ [r, in]), never a Python loop
over experts. This is the formulation PEFT uses for `target_parameters` (its ParamWrapper), with its factor
shapes:

  lora_A [E * r, in], lora_B [out, E * r]; expert e uses A_e = lora_A[e*r:(e+1)*r] and
  B_e = lora_B[:, e*r:(e+1)*r]; E = 1 for a dense projection.

Both factors are expert-major, so expert parallelism shards them like the expert weights (contiguous experts
per rank, `LoRADelta.expert_dims`). PEFT orders lora_B's columns rank-major (B_e = lora_B[:, e::E]); the
adapter files are in PEFT's order (dsmoe.checkpoint.peft_adapter converts).

Cost: the delta is materialised once per forward (and in backward the full weight gradient is formed and
projected onto A, B), so LoRA saves the optimizer state and gradients of the frozen weights, not backward FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.utils import parametrize

from dsmoe.errors import UserError

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")  # dense layers' MLP and the shared experts
EXPERTS = ("experts",)  # both stacked expert weights: gate_up_proj and down_proj
TARGET_GROUPS = {"attention": ATTENTION, "mlp": DENSE_MLP, "experts": EXPERTS}
ALL_TARGETS = ATTENTION + DENSE_MLP + EXPERTS


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ALL_TARGETS

    @classmethod
    def parse(cls, rank: int, alpha: float | None, targets: list[str] | None) -> LoRASpec:
        if rank < 1:
            raise UserError(f"--lora-rank {rank}: must be at least 1")
        if alpha is not None and not alpha > 0:  # NaN too: a scale of 0 leaves the factors untrained
            raise UserError(f"--lora-alpha {alpha}: must be above 0 (the update is scaled by alpha / rank)")
        names: list[str] = []
        for t in targets or ["attention", "experts"]:  # the default PEFT can load (see checkpoint/peft_adapter.py)
            group = TARGET_GROUPS.get(t, (t,) if t in ALL_TARGETS else None)
            if group is None:
                raise UserError(f"--lora-targets {t!r}: choose from {', '.join(TARGET_GROUPS)} or module names "
                                f"{', '.join(ALL_TARGETS)}")
            names += [n for n in group if n not in names]
        return cls(rank, float(alpha if alpha is not None else 2 * rank), tuple(names))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRADelta(nn.Module):
    """The parametrization weight -> weight + scaling * B @ A (per expert for a 3-D weight)."""

    expert_dims = {"lora_A": 0, "lora_B": 1}  # the dimension of each factor that runs over the experts

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float):
        super().__init__()
        self.num_experts = weight.shape[0] if weight.dim() == 3 else 1
        self.out_features, self.in_features = weight.shape[-2:]
        self.rank, self.scaling = rank, scaling
        for name, factor in self.new_factors(weight.device).items():
            setattr(self, name, nn.Parameter(factor))

    def new_factors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh factors of every expert, fp32: A as PEFT draws it (from `device`'s generator; on the meta device
        nothing is drawn), B = 0, which makes the start exact."""
        factory = dict(device=device, dtype=torch.float32)
        lora_A = torch.empty(self.num_experts * self.rank, self.in_features, **factory)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        return {"lora_A": lora_A, "lora_B": torch.zeros(self.out_features, self.num_experts * self.rank, **factory)}

    def delta(self, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """scaling * B @ A per expert, of this module's factors or of the given ones (gathered copies)."""
        E, r = self.num_experts, self.rank
        lora_A = self.lora_A if lora_A is None else lora_A
        lora_B = self.lora_B if lora_B is None else lora_B
        A = lora_A.view(E, r, -1)  # [E, r, in]
        B = lora_B.view(lora_B.shape[0], E, r).transpose(0, 1)  # [E, out, r]
        delta = torch.bmm(B, A) * self.scaling
        return delta if E > 1 else delta[0]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def adapted_weights(model: nn.Module, spec: LoRASpec):
    """(module, parameter name, dotted module path) of every weight the spec targets."""
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in spec.targets or parametrize.is_parametrized(module):
            continue
        if leaf == "experts":
            yield from ((module, p, path) for p in ("gate_up_proj", "down_proj"))
        elif isinstance(module, nn.Linear):
            yield module, "weight", path


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Freeze the adapted weights and add trainable factors; returns the adapted parameter paths."""
    added = []
    for module, name, path in list(adapted_weights(model, spec)):
        weight = getattr(module, name)
        weight.requires_grad_(False)
        parametrize.register_parametrization(module, name, LoRADelta(weight, spec.rank, spec.scaling))
        added.append(f"{path}.{name}")
    if not added:
        raise UserError(f"--lora-targets {' '.join(spec.targets)} matches no layer of this model")
    return added


def lora_factors(model: nn.Module):
    """(parameter path, LoRADelta) of every adapted weight, in module order."""
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRADelta):
                        yield (f"{path}.{name}" if path else name), p


def adapted_modules(model: nn.Module) -> list[str]:
    """The names of the modules LoRA adapts in `model`, in module order ("q_proj", ..., "experts" for the stacked
    routed experts, "gate_proj"... for dense MLPs and shared experts): what a target list came to in this model."""
    return list(dict.fromkeys(path.split(".")[-2] for path, _ in lora_factors(model)))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every delta into its weight (in place) and drop the factors: a plain model again. A sharded model
    (FSDP2, expert parallel: DTensor weights and factors) folds shard by shard, on every rank: the factors, which
    are small, are gathered, and each rank adds its own slice of the delta to its slice of the weight."""
    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        for name in list(module.parametrizations):
            (delta,) = module.parametrizations[name]
            original = module.parametrizations[name].original
            with torch.no_grad():
                full = delta.delta(_gathered(delta.lora_A), _gathered(delta.lora_B)).to(original.dtype)
                original.add_(_sliced_like(full, original))  # what forward adds: weight + delta in weight's dtype
            _unparametrize(module, name)
    return model


def _unparametrize(module: nn.Module, name: str) -> None:
    """torch's remove_parametrizations(leave_parametrized=False), also for a module whose class was subclassed
    after it was parametrized (FSDP2's fully_shard does that to expert-parallel experts): the weight's property
    then sits on a base class, which torch's version does not look for."""
    original = module.parametrizations[name].original
    owner = next(c for c in type(module).__mro__ if isinstance(vars(c).get(name), property))
    delattr(owner, name)
    del module.parametrizations[name]
    module.register_parameter(name, original)
    if not len(module.parametrizations):
        delattr(module, "parametrizations")
        if owner is type(module):
            module.__class__ = owner.__bases__[0]


def _gathered(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _sliced_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) as a DTensor laid out like `like`: each rank keeps its own slice."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
