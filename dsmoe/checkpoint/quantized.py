"""Loading into a quantized model (`load_pretrained(..., quantize="fp8" | "int8")`).

The model is quantized on the meta device before any weight is read, so the full-precision weights are never
held. Each checkpoint tensor that lands in a quantized module goes one of two ways:
- DeepSeek-V3's own FP8 codes into an fp8 model, block-aligned (every hub tensor of V3 is): the codes and
  their `weight_scale_inv` are copied as stored, never dequantised;
- anything else (bf16/fp32 checkpoints, int8, FP8 pieces that straddle a 128-row block): the piece is
  dequantised if needed and staged in full precision until its whole tensor (e.g. all 2E expert halves) has
  arrived, then quantized once, so the codes equal `quantize` of the whole weight.
"""

from __future__ import annotations

import torch

from dsmoe.kernels.quant import FP8_BLOCK, dequantize, quantize
from dsmoe.model.quantized import QuantExperts, QuantLinear


class QuantizedTargets:
    """The code buffers of a quantized model and what fills them; `take` returns False for other names."""

    def __init__(self, model: torch.nn.Module, scheme: str, block: tuple[int, int]):
        self.scheme, self.block = scheme, tuple(block)
        self.codes: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.pieces: dict[str, int] = {}  # name -> pieces the whole tensor arrives in (a fused tensor counts all)
        self.staged: dict[str, torch.Tensor] = {}
        self.arrived: dict[str, int] = {}
        self.native: set[str] = set()  # names with pieces copied as they are stored (FP8 codes and block scales)
        for prefix, module in model.named_modules():
            names = {QuantLinear: ("weight",), QuantExperts: ("gate_up_proj", "down_proj")}.get(type(module), ())
            for attr in names:
                name = f"{prefix}.{attr}"
                self.codes[name] = getattr(module, attr)
                self.scales[name] = getattr(module, f"{attr}_scale")
                E = self.codes[name].shape[0]
                self.pieces[name] = 2 * E if attr == "gate_up_proj" else (E if attr == "down_proj" else 1)

    def __contains__(self, name: str) -> bool:
        return name in self.codes

    def take(self, name: str, tensor: torch.Tensor, scale_inv: torch.Tensor | None, expert: int | None,
             part: str | None, copy_into) -> None:
        """Place one checkpoint tensor (FP8 codes with scale_inv, or a float tensor) into `name`."""
        codes, scales = self.codes[name], self.scales[name]
        rows = _rows(codes, expert, part)
        if expert is None and part is None and codes.dim() == 3:  # a fused [E, ...] tensor: every piece at once
            self.arrived[name] = self.pieces[name] - 1
        if scale_inv is not None and name not in self.staged and self._native(codes, rows):
            copy_into(codes, tensor, expert, part)
            r0, r1 = (rows.start // FP8_BLOCK, -(-rows.stop // FP8_BLOCK)) if rows else (0, scales.shape[-2])
            dest = scales[expert] if expert is not None else scales
            dest[r0:r1].copy_(scale_inv.to(dest.dtype))
            self.native.add(name)
        else:
            if scale_inv is not None:
                tensor = dequantize(tensor, scale_inv, torch.float32, self.block)
            if name not in self.staged:  # pieces already copied as codes go through the requantisation too
                self.staged[name] = (dequantize(codes, scales, torch.float32, self.block) if name in self.native
                                     else torch.zeros(codes.shape, dtype=torch.float32, device=codes.device))
            copy_into(self.staged[name], tensor, expert, part)
        self.arrived[name] = self.arrived.get(name, 0) + 1
        if self.arrived[name] == self.pieces[name] and name in self.staged:
            q, s = quantize(self.staged.pop(name), self.scheme)
            codes.copy_(q)
            scales.copy_(s)

    def _native(self, codes: torch.Tensor, rows: slice | None) -> bool:
        if codes.dtype != torch.float8_e4m3fn or self.block != (FP8_BLOCK, FP8_BLOCK):
            return False
        return rows is None or (rows.start % FP8_BLOCK == 0 and (rows.stop - rows.start) % FP8_BLOCK == 0)

    def incomplete(self) -> list[str]:
        return [f"{n} ({self.arrived.get(n, 0)} of {self.pieces[n]} pieces)" for n in self.codes
                if self.arrived.get(n, 0) not in (0, self.pieces[n])]


def _rows(codes: torch.Tensor, expert: int | None, part: str | None) -> slice | None:
    """The rows of one expert's stacked tensor that a gate / up half covers (None: all of them)."""
    if expert is None or part not in ("gate", "up"):
        return None
    F = codes.shape[1] // 2
    return slice(0, F) if part == "gate" else slice(F, 2 * F)
