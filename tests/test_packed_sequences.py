"""Packed sequences (several examples per row, positions restarting per example, attention kept inside each
example by segment ids): every example's logits, MTP logits, losses, gradients (the sequence-wise balance loss's
included) and routing counts equal those of the examples run alone, for MLA and MHA models."""

import pytest
import torch
import torch.nn.functional as F

from dsmoe.presets import PRESETS
from dsmoe.finetune import data as ftdata
from dsmoe.model.mtp import mtp_loss
from dsmoe.model.transformer import build_model
from dsmoe.train.loss import IGNORE_INDEX, next_token_loss

LENGTHS = [6, 3, 9]  # tokens per example; a row of width 64 holds all three with padding after them


def config(attention: str, mtp: int = 0):
    # a large sequence-wise balance loss: each packed example must be its own sequence, as when run alone
    cfg = PRESETS["tiny"].replace(vocab_size=61, num_hidden_layers=2, num_nextn_predict_layers=mtp,
                                  aux_loss_alpha=0.1, seq_aux=True)
    if attention == "mha":
        cfg = cfg.replace(kv_lora_rank=None, q_lora_rank=None, num_key_value_heads=2)
    return cfg


def examples(seed: int = 0) -> list[ftdata.Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 61, (n,), generator=g).tolist()
        out.append(ftdata.Example(ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]))  # two prompt tokens
    return out


def alone(e: ftdata.Example) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([e.ids[:-1]]), torch.tensor([e.labels[1:]])


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_each_packed_example_computes_what_it_computes_alone(attention):
    torch.manual_seed(0)
    model = build_model(config(attention), dtype=torch.float32).train()
    batch = ftdata.packed_batch([examples()], pad_id=0, width=64)
    logits = model(batch.input_ids, batch.positions, token_mask=batch.token_mask, packing=batch.packing)
    packed_counts = model.routing_stats()[0]
    counts, at = 0, 0
    for e in examples():
        ids, _ = alone(e)
        torch.testing.assert_close(logits[0, at:at + ids.shape[1]], model(ids)[0], rtol=1e-5, atol=1e-5)
        counts = counts + model.routing_stats()[0]
        at += ids.shape[1]
    assert torch.equal(packed_counts, counts)  # the padded tail is routed but not counted


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_packed_losses_and_gradients_equal_the_examples_alone(attention):
    """Token sums: the packed row's main and MTP cross-entropy (targets in another example left out) and their
    gradients equal the sums over the examples run one by one."""
    torch.manual_seed(0)
    model = build_model(config(attention, mtp=1), dtype=torch.float32).train()
    batch = ftdata.packed_batch([examples()], pad_id=0, width=64)

    def token_sums(logits, mtp_logits, labels, segment_ids=None):
        lm = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        depth1 = labels[:, 1:]
        if segment_ids is not None:
            depth1 = depth1.masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], IGNORE_INDEX)
        n_mtp = (depth1 != IGNORE_INDEX).sum()
        mtp = mtp_loss(mtp_logits, labels, IGNORE_INDEX, segment_ids) * n_mtp  # mean -> sum
        return lm, mtp, n_mtp

    model.set_aux_loss_scale(1.0)  # the balance loss is a mean over sequences: 3 packed ones = 3 x 1/3 alone
    lm, mtp, n_mtp = token_sums(*model(batch.input_ids, batch.positions, with_mtp=True,
                                       token_mask=batch.token_mask, packing=batch.packing),
                                batch.labels, batch.segment_ids)
    packed_counts = model.routing_stats()[0]  # the MTP module's layer counts no token of the next example
    (lm + mtp).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    lm_alone = mtp_alone = n_alone = counts = 0
    model.set_aux_loss_scale(1.0 / len(LENGTHS))
    for e in examples():
        ids, labels = alone(e)
        a, b, n = token_sums(*model(ids, with_mtp=True, token_mask=torch.ones_like(ids, dtype=torch.bool)), labels)
        lm_alone, mtp_alone, n_alone = lm_alone + a, mtp_alone + b, n_alone + n
        counts = counts + model.routing_stats()[0]
    (lm_alone + mtp_alone).backward()
    assert torch.equal(packed_counts, counts)
    assert n_mtp == n_alone == sum(n - 2 for n in LENGTHS)  # from input 0 (token 2) to the third-last input
    torch.testing.assert_close(lm, lm_alone)
    torch.testing.assert_close(mtp, mtp_alone)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_sft_loss_of_a_packed_batch_is_the_mean_over_its_target_tokens():
    torch.manual_seed(0)
    model = build_model(config("mla"), dtype=torch.float32).train()
    batch = ftdata.packed_batch([examples()[:2], examples()[2:]], pad_id=0, width=64)
    loss, _ = next_token_loss(model, batch)
    total = sum(F.cross_entropy(model(ids)[0], labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
                for ids, labels in map(alone, examples()))
    torch.testing.assert_close(loss, total / sum(n - 2 for n in LENGTHS))  # every token after the prompt


@pytest.mark.gpu
def test_packed_bf16_on_the_gpu_matches_the_examples_alone():
    torch.manual_seed(0)
    model = build_model(config("mla"), device="cuda", dtype=torch.bfloat16).train()
    batch = ftdata.packed_batch([examples()], pad_id=0, width=64).to("cuda")
    with torch.no_grad():
        logits = model(batch.input_ids, batch.positions, packing=batch.packing)
        at = 0
        for e in examples():
            ids, _ = alone(e)
            torch.testing.assert_close(logits[0, at:at + ids.shape[1]], model(ids.cuda())[0], rtol=0.02, atol=0.02)
            at += ids.shape[1]
