"""Output projection + next-token cross-entropy without the (T, vocab) fp32 logits.

The plain version (`linear_cross_entropy_reference`, the spec) computes logits = hidden @ weight^T for every
token, casts them to fp32 and takes the mean cross-entropy: at T = 16384 tokens and a 32000-token vocabulary
that is 2 GiB of fp32 logits, kept for backward, plus their gradient. `linear_cross_entropy` walks the tokens
in chunks and, for each chunk, computes the logits, the loss and the gradient of the logits at once (softmax
minus one-hot, exact because the loss is linear in its upstream gradient), folds that gradient into the
gradients of the hidden states and of the weight, and drops the chunk. Backward then only scales the two
stored gradients. Peak extra memory: one chunk's logits (~256 MiB) and an fp32 weight gradient.

Precision matches the reference under autocast: the GEMMs run in the autocast dtype (bf16 on GPUs), the
log-softmax in fp32; the weight gradient is summed over chunks in fp32. One difference: where every label is
ignored the reference gives NaN (0 / 0) and this gives 0, so a micro-batch without labelled tokens (possible in
fine-tuning) does not make the trainer skip the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MiB in fp32


def linear_cross_entropy_reference(hidden_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor
                                   ) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not IGNORE_INDEX (the spec)."""
    logits = hidden_TD @ weight_VD.t()
    return F.cross_entropy(logits.float(), labels_T, ignore_index=IGNORE_INDEX)


def linear_cross_entropy(hidden_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """The same value and gradients as the reference, one chunk of tokens at a time. chunk_tokens: tokens per
    chunk (default: CHUNK_ELEMENTS / vocabulary)."""
    device = hidden_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_TD.dtype
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight_VD.shape[0])
    return _LinearCrossEntropy.apply(hidden_TD, weight_VD, labels_T, dtype, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, labels_T, dtype: torch.dtype, chunk: int):
        with torch.autocast(hidden_TD.device.type, enabled=False):
            h_TD, w_VD = hidden_TD.to(dtype), weight_VD.to(dtype)
            want_h, want_w = hidden_TD.requires_grad, weight_VD.requires_grad
            grad_h = torch.empty_like(h_TD) if want_h else None
            grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_w else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
            for start in range(0, h_TD.shape[0], chunk):
                h, labels = h_TD[start:start + chunk], labels_T[start:start + chunk]
                logits = (h @ w_VD.t()).float()
                valid = labels != IGNORE_INDEX
                target = torch.where(valid, labels, 0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                loss_sum += torch.where(valid, lse - picked, 0.0).sum()
                if not (want_h or want_w):
                    continue
                # d(sum of losses)/d logits = softmax - one_hot(target). Ignored rows are zeroed in the (chunk, D)
                # operands and results instead of the (chunk, V) gradient: two passes over the logits fewer.
                grad_logits = torch.softmax(logits, dim=-1)
                grad_logits.scatter_add_(1, target[:, None], torch.full_like(picked[:, None], -1.0))
                grad_logits = grad_logits.to(dtype)
                keep = valid[:, None].to(dtype)
                if want_h:
                    torch.mm(grad_logits, w_VD, out=grad_h[start:start + chunk]).mul_(keep)
                if want_w:
                    grad_w += (grad_logits.t() @ (h * keep)).float()
            scale = 1.0 / (labels_T != IGNORE_INDEX).sum().clamp_min(1).float()
        ctx.save_for_backward(grad_h, grad_w, scale)
        ctx.dtypes = hidden_TD.dtype, weight_VD.dtype
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, scale = ctx.saved_tensors
        factor = grad_loss * scale
        dh = None if grad_h is None else (grad_h * factor).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * factor).to(ctx.dtypes[1])
        return dh, dw, None, None, None
