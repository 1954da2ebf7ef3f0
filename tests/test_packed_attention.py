"""Packed attention's paths (model/packed_attention.py): the layout a packed batch carries, and the varlen path
(torch's flash kernel on CUDA; on the CPU a plain-PyTorch stand-in with the kernel's contract) and the flex path
(eager on the CPU, compiled on CUDA) against the SDPA document-mask reference, forward and every gradient, for MLA
(v narrower than q/k) and MHA (GQA) models.

Rows: one example; three (one of them T=1); many short ones; one example exactly as wide as the row."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dsmoe.presets import PRESETS
from dsmoe.errors import UserError
from dsmoe.finetune import data as ftdata
from dsmoe.model import packed_attention as pa
from dsmoe.model.packed_attention import PackedLayout, adapt, document_block_mask, document_mask, packed_attention
from dsmoe.model.transformer import build_model, cast_model
from dsmoe.train.loss import IGNORE_INDEX, next_token_loss

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH = 64
ROWS = [[20], [6, 1, 9], [1, 2, 3, 4, 5] * 3, [WIDTH]]  # positions per example, row by row


def packed_rows(vocab: int = 61, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sizes in ROWS:
        row = []
        for n in sizes:  # n positions: n + 1 tokens; the first token is a prompt, no loss on its target
            ids = torch.randint(0, vocab, (n + 1,), generator=g).tolist()
            row.append(ftdata.Example(ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]))
        rows.append(row)
    return ftdata.packed_batch(rows, pad_id=0, width=WIDTH)


def test_the_layout_of_a_packed_batch_delimits_every_example_and_each_padded_tail():
    batch = packed_rows()
    layout = batch.packing
    bounds = []
    for b, sizes in enumerate(ROWS):
        at = b * WIDTH
        for n in sizes:
            bounds.append(at)
            at += n
        if at < (b + 1) * WIDTH:
            bounds.append(at)  # the padded tail: a run of its own
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == bounds + [len(ROWS) * WIDTH]
    assert layout.max_len == WIDTH  # the full row
    assert batch.input_ids.shape == (len(ROWS), WIDTH)
    assert layout.segment_ids[1].tolist()[:17] == [0] * 6 + [1] + [2] * 9 + [-1]
    assert torch.equal(batch.segment_ids, layout.segment_ids)
    moved = layout.to(torch.device("cpu"))
    assert moved.kernel is None and moved.mask is None and moved.max_len == WIDTH


def test_a_row_without_padding_and_one_long_example_give_the_longest_run():
    layout = PackedLayout.from_segment_ids(torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]]))
    assert layout.cu_seqlens.tolist() == [0, 2, 5, 6, 12] and layout.max_len == 6


def test_off_cuda_the_forward_takes_the_mask_once():
    layout = packed_rows().packing.for_forward()
    assert layout.kernel is None
    assert torch.equal(layout.mask, document_mask(layout.segment_ids))
    assert layout.for_forward() is layout


def test_dsmoe_packed_attention_names_its_choices(monkeypatch):
    monkeypatch.setenv("DSMOE_PACKED_ATTENTION", "flex")  # CUDA only (no CPU backward): the mask here
    assert packed_rows().packing.for_forward().block_mask is None
    monkeypatch.setenv("DSMOE_PACKED_ATTENTION", "flash")
    with pytest.raises(UserError, match="one of varlen, flex, sdpa"):
        packed_rows().packing.for_forward()


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch.nn.attention.varlen.varlen_attn's contract (torch >= 2.10 keywords) in plain PyTorch, with the flash
    kernel's constraints asserted: one head width for q, k and v, int32 boundaries, the exact longest run."""
    assert window_size == (-1, 0) and return_aux is None
    assert query.shape[-1] == key.shape[-1] == value.shape[-1] and cu_seq_q.dtype == torch.int32
    assert cu_seq_q is cu_seq_k and max_q == max_k == int(cu_seq_q.diff().max())
    out = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


def reference_varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.9's keywords: is_causal, no scale (the kernel's own 1/sqrt(D))."""
    assert is_causal
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


def model_config(attention: str, mtp: int = 0):
    cfg = PRESETS["tiny"].replace(vocab_size=61, num_hidden_layers=2, num_nextn_predict_layers=mtp)
    if attention == "mha":
        cfg = cfg.replace(kv_lora_rank=None, q_lora_rank=None, num_key_value_heads=2)
    return cfg


def forward_and_grads(model, batch, layout):
    """Logits of every position (padding included) and the gradients of the SFT loss plus a random projection of
    all logits (so the padded positions' outputs reach the gradients too)."""
    model.zero_grad()
    loss, _ = next_token_loss(model, replace(batch, packing=layout))
    logits = model(batch.input_ids, batch.positions, token_mask=batch.token_mask, packing=layout)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits)
    (loss + (logits.float() * weights.float()).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def with_varlen(kernel):
    return lambda packing: replace(packing, kernel=adapt(kernel))


def with_flex(packing):
    return replace(packing, block_mask=document_block_mask(packing.segment_ids))


def with_mask(packing):
    return replace(packing, mask=document_mask(packing.segment_ids))


@pytest.mark.parametrize("attention,path,mtp", [("mla", with_varlen(reference_varlen), 1),
                                                ("mha", with_varlen(reference_varlen), 0),
                                                ("mla", with_varlen(reference_varlen_2_9), 0)])
def test_the_varlen_path_equals_the_mask_path_forward_and_gradients(attention, path, mtp, monkeypatch):
    monkeypatch.setattr(pa, "FLASH_DTYPES", (torch.float32,))  # the varlen stand-in runs in fp32 on the CPU
    torch.manual_seed(0)
    model = build_model(model_config(attention, mtp), dtype=torch.float32).train()
    batch = packed_rows()
    logits, grads = forward_and_grads(model, batch, path(batch.packing))
    ref_logits, ref_grads = forward_and_grads(model, batch, with_mask(batch.packing))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention,mtp", [("mla", 1), ("mha", 0)])
def test_the_flex_path_equals_the_mask_path_forward(attention, mtp):
    """Forward only: torch has no CPU backward for flex attention (the GPU test checks its gradients)."""
    torch.manual_seed(0)
    model = build_model(model_config(attention, mtp), dtype=torch.float32).eval()
    batch = packed_rows()
    with torch.no_grad():
        logits, ref_logits = (model(batch.input_ids, batch.positions, token_mask=batch.token_mask, packing=path(
            batch.packing), with_mtp=bool(mtp)) for path in (with_flex, with_mask))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@torch.library.custom_op("dsmoe_test::varlen", mutates_args=())
def _reference_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                         scale: float) -> torch.Tensor:
    return reference_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, window_size=(-1, 0))


@_reference_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_len, scale):
    return torch.empty_like(q)


def varlen_op(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1)):
    """As torch's varlen_attn: an opaque custom op (with a fake) behind the Python function compile traces."""
    return _reference_varlen_op(query, key, value, cu_seq_q, max_q, scale)


def test_compiled_blocks_take_new_layouts_without_recompiling_after_the_first_two():
    """Every packed batch brings a new example count (cu_seqlens' length) and longest example (an int): after one
    recompilation that makes both dynamic, the compiled blocks take any layout, and compute the mask path's
    result."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = build_model(model_config("mla"), dtype=torch.float32, moe_impl="reference").eval()
    for block in model.blocks():
        block.compile(backend="eager")
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for trial in range(6):
                if trial == 3:
                    graphs = counters["stats"]["unique_graphs"]
                sizes = torch.randint(1, 20, (12,), generator=g).tolist()
                rows = [sizes[:trial % 4 + 2], sizes[6:6 + trial % 3 + 1]]
                segments = torch.full((2, WIDTH), -1)
                for b, row in enumerate(rows):
                    at = 0
                    for j, n in enumerate(row):
                        segments[b, at:at + n] = j
                        at += n
                layout = PackedLayout.from_segment_ids(segments)
                ids = torch.randint(0, 61, (2, WIDTH), generator=g)
                with torch.compiler.set_stance("force_eager"):
                    expected = model(ids, packing=layout)
                torch.testing.assert_close(model(ids, packing=replace(layout, kernel=adapt(varlen_op))), expected,
                                           rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


# ---- the CUDA kernel (for the lead's H200 run: pytest -m gpu tests/test_packed_attention.py) --------------

def _qkv(B, H, S, dqk, dv, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, S, d, device="cuda", generator=g, dtype=torch.float32).to(dtype).requires_grad_()
            for d in (dqk, dqk, dv)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["varlen", "flex"])
@pytest.mark.parametrize("dqk,dv", [(192, 128), (96, 64), (128, 128)])  # V2/V3 MLA, the small preset, MHA
def test_the_gpu_kernels_match_the_fp32_mask_path_forward_and_gradients(dqk, dv, kind):
    """bf16 varlen (torch's flash kernel) or compiled flex, and the bf16 mask path, each against the fp32 mask
    path: the kernel's error stays within a small multiple of what bf16 SDPA itself makes."""
    layout = packed_rows().packing.to("cuda")
    if kind == "varlen":
        kernel = pa.installed_varlen()
        assert kernel is not None, "this torch has no torch.nn.attention.varlen"
        fast = replace(layout, kernel=kernel)
    else:
        fast = with_flex(layout)
    B, S = layout.segment_ids.shape
    scale = dqk ** -0.5
    grad_out = torch.randn(B, 4, S, dv, device="cuda")

    def run(dtype, path):
        q, k, v = _qkv(B, 4, S, dqk, dv, dtype)
        out = packed_attention(q, k, v, scale, path)
        out.float().backward(grad_out)
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    exact = run(torch.float32, with_mask(layout))
    kernel_results = run(torch.bfloat16, fast)
    masked = run(torch.bfloat16, with_mask(layout))
    for name, e, a, m in zip(("out", "dq", "dk", "dv"), exact, kernel_results, masked):
        err, ref_err = (a - e).abs().max().item(), (m - e).abs().max().item()
        assert err <= 3 * ref_err + 1e-3, f"{name}: {kind} {err:.2e} vs bf16 SDPA {ref_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_on_cuda_the_model_takes_varlen_in_bf16_and_the_mask_in_fp32(attention):
    """Dense layers only: a bf16 rounding difference must not flip a routing choice, which would move the
    gradients by far more than attention's own error."""
    batch = packed_rows().to("cuda")
    assert batch.packing.for_forward().kernel is not None
    torch.manual_seed(0)
    config = model_config(attention)
    model = build_model(config.replace(first_k_dense_replace=config.num_hidden_layers), device="cuda",
                        dtype=torch.float32).train()
    exact_logits, exact_grads = forward_and_grads(model, batch, batch.packing)  # fp32: the kernel is skipped
    masked = replace(batch.packing, mask=document_mask(batch.segment_ids))
    torch.testing.assert_close(forward_and_grads(model, batch, masked)[0], exact_logits, rtol=0, atol=0)
    cast_model(model, torch.bfloat16)
    logits, grads = forward_and_grads(model, batch, batch.packing)
    ref_logits, ref_grads = forward_and_grads(model, batch, masked)
    for name, exact in [("logits", exact_logits), *exact_grads.items()]:
        a = logits if name == "logits" else grads[name]
        m = ref_logits if name == "logits" else ref_grads[name]
        err, ref_err = (a.float() - exact).abs().max().item(), (m.float() - exact).abs().max().item()
        assert err <= 3 * ref_err + 1e-3 * exact.abs().max().item(), f"{name}: {err:.2e} vs {ref_err:.2e}"


@pytest.mark.gpu
def test_under_the_trainers_bf16_autocast_every_layer_takes_the_kernel():
    batch = packed_rows().to("cuda")
    model = build_model(model_config("mla", mtp=1), device="cuda", dtype=torch.float32).train()
    kernel, calls = pa.installed_varlen(), []

    def counting(*args):
        calls.append(args[0].dtype)
        return kernel(*args)

    with torch.autocast("cuda", torch.bfloat16):
        next_token_loss(model, replace(batch, packing=replace(batch.packing, kernel=counting)))[0].backward()
    assert calls == [torch.bfloat16] * (2 + 1)  # two layers and the MTP module


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["varlen", "flex"])
def test_compiled_bf16_sft_fine_tune_tracks_the_mask_path(path, model_dir, tmp_path, monkeypatch):
    """`dsmoe finetune --task sft --compile` in bf16 on the GPU, each kernel path vs DSMOE_PACKED_ATTENTION=sdpa:
    the same losses to bf16 precision, step after step (the batches' layouts differ: the compiled blocks take
    new example counts and lengths without failing)."""
    from dsmoe.cli import main

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "say " * (i % 7 + 1) + str(i)},
                                                     {"role": "assistant", "content": f"{i}!" * (i % 5 + 1)}]}) + "\n"
                            for i in range(64)))
    argv = ["finetune", str(model_dir), "--task", "sft", "--data", str(data), "--steps", "6", "--log-interval", "1",
            "--seq-len", "128", "--micro-batch", "4", "--device", "cuda", "--dtype", "bf16", "--compile",
            "--no-progress", "--eval-interval", "100", "--warmup-steps", "1"]
    monkeypatch.setenv("DSMOE_PACKED_ATTENTION", path)
    assert main([*argv, "--out", str(tmp_path / path)]) == 0
    torch._dynamo.reset()  # the second run compiles afresh, as a new process would
    monkeypatch.setenv("DSMOE_PACKED_ATTENTION", "sdpa")
    assert main([*argv, "--out", str(tmp_path / "sdpa")]) == 0

    def losses(run):
        return [json.loads(line)["lm_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"lm_loss"' in line]

    fast, sdpa = losses(tmp_path / path), losses(tmp_path / "sdpa")
    assert len(fast) == len(sdpa) >= 6
    assert fast == pytest.approx(sdpa, rel=2e-2)
