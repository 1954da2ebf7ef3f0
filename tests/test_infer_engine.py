"""The engine: greedy = a full-forward argmax loop, batched = one by one, requests joining and leaving mid-way
(chunked prefill, cancellation, slot reuse) produce the same tokens as alone, stop ids, logprobs."""

import pytest
import torch

from dsmoe.errors import UserError
from dsmoe.infer.engine import Engine
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams
from dsmoe.model.transformer import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY = SamplingParams(max_new_tokens=10, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=11)
FILTERED = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=11)  # drawn inside the step


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config(128), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 128, (n,), generator=g).tolist() for n in (3, 11, 5, 1, 17, 8)]


def alone(model, prompt, params):
    return generate(model, [prompt], params)[0]


def test_greedy_equals_full_forward_argmax_loop(model, prompts):
    seq = list(prompts[1])
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert alone(model, prompts[1], GREEDY) == seq[len(prompts[1]):]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED, FILTERED], ids=["greedy", "sampled", "filtered"])
def test_batched_generation_equals_one_by_one(model, prompts, params, overlap):
    """overlap=True runs the CUDA schedule (one step in flight, results read a step late) on the CPU."""
    batched = generate(model, prompts, params, max_batch=4, prefill_chunk=4, overlap=overlap)
    assert batched == [alone(model, p, params) for p in prompts]
    assert all(len(out) == params.max_new_tokens for out in batched)


@pytest.mark.parametrize("params", [GREEDY, FILTERED], ids=["greedy", "filtered"])
def test_the_step_samples_inside_unless_a_request_needs_logits(model, prompts, params):
    """Without logprobs or a repetition penalty the decode step draws its tokens inside (one CUDA graph holds it
    all); a request that needs logits sends the whole batch through the host-side sampler: the same tokens."""
    engine = Engine(model, max_batch=4, max_model_len=64)
    inside, sampling = [], engine.runner.sampling
    engine.runner.sampling = lambda flags: inside.append(flags) or sampling(flags)
    alone_outputs = [generate_with(engine, [p], params)[0] for p in prompts[:3]]
    assert len(inside) == 3 * (params.max_new_tokens - 1)  # every decode step (the prefill samples the first)
    inside.clear()
    with_logprobs = SamplingParams(max_new_tokens=10, temperature=0, logprobs=2)
    together = generate_with(engine, prompts[:3] + [prompts[3]], params, last=with_logprobs)
    assert together[:3] == alone_outputs and not inside


def generate_with(engine, prompts, params, last=None):
    ids = [engine.add_request(p, last if last is not None and i == len(prompts) - 1 else params)
           for i, p in enumerate(prompts)]
    out = {i: [] for i in ids}
    while engine.has_work():
        for s in engine.step():
            out[s.request_id] += s.token_ids
    return [out[i] for i in ids]


def test_seeded_sampling_repeats_and_seeds_differ(model, prompts):
    first = alone(model, prompts[0], SAMPLED)
    assert alone(model, prompts[0], SAMPLED) == first
    other = SamplingParams(**{**SAMPLED.__dict__, "seed": 12})
    assert alone(model, prompts[0], other) != first


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_requests_join_and_leave_mid_way(model, prompts, overlap):
    """Slots 3, prefill chunk 4: A and B start; C (17-token prompt) joins after 2 steps and prefills over
    several steps while A and B keep decoding; B is cancelled mid-way; D takes B's slot."""
    engine = Engine(model, max_batch=3, max_model_len=64, prefill_chunk=4, overlap=overlap)
    got: dict[str, list[int]] = {}
    tokens_per_step = []

    def step():
        outs = engine.step()
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.token_ids)
        tokens_per_step.append({o.request_id for o in outs if o.token_ids})

    a = engine.add_request(prompts[0], GREEDY)
    b = engine.add_request(prompts[2], SAMPLED)
    step(), step()
    c = engine.add_request(prompts[4], SAMPLED)
    for _ in range(3):
        step()
    assert a in tokens_per_step[-2] and a in tokens_per_step[-3]  # A decoded while C was being prefilled
    engine.cancel(b)
    d = engine.add_request(prompts[5], GREEDY)
    while engine.has_work():
        step()
    assert got[a] == alone(model, prompts[0], GREEDY)
    assert got[c] == alone(model, prompts[4], SAMPLED)
    assert got[d] == alone(model, prompts[5], GREEDY)
    full_b = alone(model, prompts[2], SAMPLED)
    assert 0 < len(got[b]) < len(full_b) and got[b] == full_b[: len(got[b])]


def test_more_requests_than_slots(model, prompts):
    many = prompts * 2
    assert generate(model, many, GREEDY, max_batch=2) == [alone(model, p, GREEDY) for p in many]


def record_prefill_forwards(engine) -> list[tuple]:
    """(rows, tokens per row, start, slots) of every prefill forward the engine runs from now on."""
    forwards, prefill = [], engine.runner.prefill

    def recording(ids, slots, start, **kw):
        forwards.append((*ids.shape, start, slots))
        return prefill(ids, slots, start, **kw)

    engine.runner.prefill = recording
    return forwards


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_whole_prompts_share_one_prefill_forward(model, prompts, params):
    """3 slots, 16 prompt tokens per step (counted padded, rows x longest): whole prompts that fit share one
    right-padded forward, at the start and when requests join mid-way; a prompt longer than the budget falls
    back to chunks. Every request gets the tokens it gets alone (sampled: seeded, top-k/top-p, repetition
    penalty), so the padding each shorter row writes past its end is never read."""
    order = [prompts[i] for i in (0, 2, 3, 0, 3, 4, 5, 1)]  # 3 5 1 | 3 1 | 17 (chunked) | 8 11 tokens
    new_tokens = [3, 10, 3, 10, 3, 10, 3, 10]
    each = [SamplingParams(**{**params.__dict__, "max_new_tokens": n}) for n in new_tokens]
    engine = Engine(model, max_batch=3, max_model_len=64, prefill_chunk=16, overlap=False)
    forwards = record_prefill_forwards(engine)
    ids = [engine.add_request(p, q) for p, q in zip(order, each)]
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert [got[i] for i in ids] == [alone(model, p, q) for p, q in zip(order, each)]
    # 3 prompts at once; 2 more together into slots 0 and 2 once those free while slot 1 decodes; 17 tokens do
    # not fit a step, so they go alone in chunks; the 11 would not share 16 tokens with the 8
    assert forwards == [(3, 5, 0, [0, 1, 2]), (2, 3, 0, [0, 2]), (1, 16, 0, [2]), (1, 1, 16, [2]), (1, 8, 0, [1]),
                        (1, 11, 0, [0])]


def test_first_token_logprobs_of_a_shared_prefill_match_the_full_forward(model, prompts):
    """The first token of each row comes from its own last real position, not the padded end."""
    params = SamplingParams(max_new_tokens=1, temperature=0, logprobs=20)
    batch = [prompts[i] for i in (1, 3, 0)]  # 11, 1 and 3 tokens
    engine = Engine(model, max_batch=3, max_model_len=64)
    forwards = record_prefill_forwards(engine)
    ids = [engine.add_request(p, params) for p in batch]
    outs = {}
    while engine.has_work():
        outs.update((o.request_id, o) for o in engine.step())
    assert forwards == [(3, 11, 0, [0, 1, 2])]
    for rid, prompt in zip(ids, batch):
        with torch.no_grad():
            ref = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
        (entry,) = outs[rid].logprobs
        assert entry.token_id == int(ref.argmax())
        top_ids, top_lps = zip(*entry.top)
        assert list(top_ids) == ref.topk(20).indices.tolist()
        torch.testing.assert_close(torch.tensor(top_lps), ref.topk(20).values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_stop_token_ids_and_eos(model, prompts, overlap):
    reference = alone(model, prompts[3], GREEDY)
    stop = reference[3]
    first = reference.index(stop)
    engine = Engine(model, max_batch=2, max_model_len=64, eos_token_ids=[stop], overlap=overlap)
    rid = engine.add_request(prompts[3], GREEDY)
    ignoring = engine.add_request(prompts[3], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    outs = {}
    while engine.has_work():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert [o.token_ids[0] for o in outs[rid]] == reference[: first + 1]
    assert outs[rid][-1].finish_reason == "stop"
    assert [o.token_ids[0] for o in outs[ignoring]] == reference and outs[ignoring][-1].finish_reason == "length"
    by_id = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(stop,))
    assert alone(model, prompts[3], by_id) == reference[: first + 1]


def test_prompt_and_token_logprobs_match_the_full_forward(model, prompts):
    prompt = prompts[4]
    engine = Engine(model, max_batch=1, max_model_len=64, prefill_chunk=5)
    engine.add_request(prompt, SamplingParams(max_new_tokens=3, temperature=0, logprobs=2, prompt_logprobs=2))
    outs = []
    while engine.has_work():
        outs += engine.step()
    generated = [o.token_ids[0] for o in outs]
    with torch.no_grad():
        ref = model(torch.tensor([prompt + generated]))[0].log_softmax(-1)
    entries = outs[0].prompt_logprobs
    assert entries[0] is None and len(entries) == len(prompt)
    for i, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == ref[i - 1].topk(2).indices.tolist()
    for k, out in enumerate(outs):
        (entry,) = out.logprobs
        pos = len(prompt) - 1 + k
        assert entry.logprob == pytest.approx(ref[pos, generated[k]].item(), abs=1e-4)
        assert entry.top[0] == (generated[k], entry.logprob)  # greedy: the chosen token is the top-1, exactly
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_scoring_only_request(model, prompts):
    engine = Engine(model, max_batch=1, max_model_len=64)
    engine.add_request(prompts[1], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    (out,) = engine.step()
    assert out.token_ids == [] and out.finish_reason == "length" and len(out.prompt_logprobs) == len(prompts[1])
    assert not engine.has_work()


def test_repetition_penalty_discourages_repeats(model, prompts):
    plain = alone(model, prompts[0], SamplingParams(max_new_tokens=24, temperature=0))
    assert len(set(plain)) < len(plain)  # this random model repeats itself without a penalty
    penalised = alone(model, prompts[0], SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=100))
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompts[0])


def test_bad_requests_are_user_errors(model):
    engine = Engine(model, max_batch=1, max_model_len=16)
    with pytest.raises(UserError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.add_request([5, 128], GREEDY)
    with pytest.raises(UserError, match=r"\(10\).*more than max_model_len \(16\)"):
        engine.add_request([5] * 7, GREEDY)
    with pytest.raises(UserError, match="max_position_embeddings"):
        Engine(model, max_model_len=10_000)
    for bad in (0, -5):  # 0 is not "the default"
        with pytest.raises(UserError, match="max_model_len must be >= 1"):
            Engine(model, max_model_len=bad)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(tiny_config):
    """torch.compile of the decode blocks (bf16: the dtype grouped_mm traces in) gives the eager step's logits,
    and one compiled function serves every MoE block."""
    import torch._dynamo

    torch.manual_seed(0)
    model = build_model(tiny_config(128).replace(num_hidden_layers=3), dtype=torch.bfloat16, moe_impl="grouped").eval()
    eager, compiled = (Engine(model, max_batch=3, max_model_len=32, compile=c) for c in (False, True))
    for engine in (eager, compiled):
        engine.slots.input_ids[:3] = torch.tensor([5, 6, 7])
        engine.slots.positions[:3] = torch.tensor([3, 9, 1])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        got, want = compiled.runner(3, 16).float(), eager.runner(3, 16).float()
    # bf16: inductor fuses away some intermediate roundings, so single logits move by a few bf16 ulps
    assert (got - want).norm() / want.norm() < 2e-2 and (got - want).abs().max() < 5e-2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the dense block and the MoE block


def test_warm_up_runs_every_step_shape_and_changes_no_output(model, prompts):
    """dsmoe serve warms up before its first request, so that no request pays the autotuning, compilation or
    capture of a new shape (a 5.4 s time to first token at p99 on an H200 before). It writes only free slots'
    cache rows: what the engine generates after it is what a fresh engine generates."""
    engine = Engine(model, max_batch=4, max_model_len=40, prefill_chunk=12)
    prefills, steps = [], []
    prefill, forward = engine.runner.prefill, engine.runner.forward
    engine.runner.prefill = lambda ids, *a, **k: prefills.append(ids.shape[1]) or prefill(ids, *a, **k)
    engine.runner.forward = lambda B, L: steps.append(B) or forward(B, L)
    engine.warm_up()
    assert prefills == [1, 2, 4, 8, 12] and steps == [1, 2, 4]
    for params in (GREEDY, SAMPLED):
        assert generate_with(engine, prompts, params) == generate(model, prompts, params, max_batch=4,
                                                                   max_model_len=40, prefill_chunk=12)
    engine.add_request(prompts[0], GREEDY)
    with pytest.raises(UserError, match="before it takes requests"):
        engine.warm_up()
