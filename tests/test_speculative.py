"""Speculative decoding with MTP drafts and with prompt-lookup (n-gram) drafts: greedy output equals plain greedy
token for token (batched, chunked prefill, requests joining mid-way, 1-4 drafts), sampled output follows the main
model's distribution (chi-square on a 32-token vocabulary), and rolling back leaves the KV cache as plain decoding
builds it."""

import pytest
import torch
import torch.nn.functional as F

from dsmoe.presets import PRESETS
from dsmoe.errors import UserError
from dsmoe.infer.engine import Engine
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams
from dsmoe.model.mtp import mtp_loss
from dsmoe.model.transformer import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

V = 32
CFG = PRESETS["tiny"].replace(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=2, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                              v_head_dim=16, num_nextn_predict_layers=1, initializer_range=0.02,
                              bos_token_id=None, eos_token_id=None)
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def markov_batch(g, succ, B, S):
    """A low-entropy Markov chain: each token's first successor 70%, its second 20%, anything 10%."""
    x = torch.empty(B, S, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (B,), generator=g)
    for t in range(1, S):
        r = torch.rand(B, generator=g)
        x[:, t] = torch.where(r < 0.7, succ[x[:, t - 1], 0],
                              torch.where(r < 0.9, succ[x[:, t - 1], 1], torch.randint(0, V, (B,), generator=g)))
    return x


@pytest.fixture(scope="module")
def model_and_data():
    """Trained for a few seconds (main + MTP loss), so drafts are often right; then the MTP projection is
    perturbed so that they are also often wrong: both acceptance paths run."""
    g = torch.Generator().manual_seed(0)
    succ = torch.stack([torch.randperm(V, generator=g)[:2] for _ in range(V)])
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        ids = markov_batch(g, succ, 16, 33)
        logits, mtp_logits = model(ids[:, :-1], with_mtp=True)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + mtp_loss(mtp_logits, ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = model.mtp[0].eh_proj.weight
        w.add_(torch.randn(w.shape, generator=g) * w.std() * 2.5)
    prompts = [markov_batch(g, succ, 1, n)[0].tolist() for n in (3, 11, 5, 1, 17, 8)]
    return model.eval(), prompts


def run(engine, prompts, params, join_after=None):
    """All prompts at once, or the last ones joining after `join_after` steps."""
    ids, first = [], prompts if join_after is None else prompts[:-2]
    ids = [engine.add_request(p, params) for p in first]
    out, steps = {}, 0
    while engine.has_work() or len(ids) < len(prompts):
        if len(ids) < len(prompts) and steps == join_after:
            ids += [engine.add_request(p, params) for p in prompts[len(first):]]
        for s in engine.step():
            out.setdefault(s.request_id, []).extend(s.token_ids)
        steps += 1
    return [out[i] for i in ids]


@pytest.mark.parametrize("method, drafts, overlap", [("mtp", 1, False), ("mtp", 1, True), ("mtp", 3, True),
                                                     ("ngram", 2, False), ("ngram", 4, False)])
def test_greedy_speculative_equals_plain_greedy(model_and_data, method, drafts, overlap):
    """overlap: a step stays in flight while the host reads the one before (MTP drafts; on CUDA by default)."""
    model, prompts = model_and_data
    plain = generate(model, prompts, GREEDY, max_batch=3, prefill_chunk=4)
    engine = Engine(model, max_batch=3, max_model_len=64, prefill_chunk=4, speculative=method,
                    num_speculative_tokens=drafts, prompt_lookup=(1, 3), overlap=overlap)
    assert engine.overlap == overlap
    widths, compute = [], engine.spec.compute
    engine.spec.compute = lambda B, L, width, flags: widths.append(width) or compute(B, L, width, flags)
    assert run(engine, prompts, GREEDY, join_after=2) == plain
    stats = engine.speculation_stats()
    assert 0 < stats["accepted"][0] < stats["proposed"][0]  # drafts were both kept and rejected
    assert len(stats["acceptance_rate"]) == drafts
    decoded = sum(len(o) - 1 for o in plain)  # every token but the prefill's first came from a speculative step
    assert 1 < stats["tokens_per_step"] <= drafts + 1
    assert decoded <= engine.spec.advanced < decoded + len(prompts) * (drafts + 1)  # + what stopped rows cut off
    # MTP always verifies N drafts; a lookup step only as many as some row found (none: a plain decode step)
    assert set(widths) == {drafts + 1} if method == "mtp" else {1, drafts + 1} <= set(widths)


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_without_drafts_and_stop_tokens_mid_step(model_and_data, overlap):
    model, prompts = model_and_data
    plain = generate(model, prompts, GREEDY, max_batch=3)
    stop = plain[0][5]
    with_stop = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop,))
    engine = Engine(model, max_batch=3, max_model_len=64, speculative="mtp", num_speculative_tokens=2,
                    overlap=overlap)
    rids = [engine.add_request(prompts[0], with_stop),
            engine.add_request(prompts[1], SamplingParams(max_new_tokens=12, temperature=0, speculative=False)),
            engine.add_request(prompts[2], SamplingParams(max_new_tokens=5, temperature=0,
                                                          num_speculative_tokens=1))]
    out = {r: [] for r in rids}
    while engine.has_work():
        for s in engine.step():
            out[s.request_id] += s.token_ids
    assert out[rids[0]] == plain[0][: plain[0].index(stop) + 1]
    assert out[rids[1]] == plain[1]
    assert out[rids[2]] == plain[2][:5]


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_cache_after_rollback_equals_plain_decoding(model_and_data, method):
    model, prompts = model_and_data
    params = SamplingParams(max_new_tokens=9, temperature=0)
    plain = Engine(model, max_batch=2, max_model_len=48)
    spec = Engine(model, max_batch=2, max_model_len=48, speculative=method, num_speculative_tokens=3,
                  prompt_lookup=(1, 2), overlap=method == "mtp")
    for engine in (plain, spec):
        outs = run(engine, prompts[1:3], params)
    for slot, (prompt, out) in enumerate(zip(prompts[1:3], outs)):
        n = len(prompt) + len(out) - 1  # the last token is never fed back
        for (a,), (b,) in zip(plain.cache.layers, spec.cache.layers):  # MLA: one buffer per layer
            torch.testing.assert_close(b[slot, :n], a[slot, :n], rtol=1e-5, atol=1e-5)


def exact_marginals(model, prompt, steps):
    """P(token k of the continuation), k = 1..steps, by enumerating every continuation (V^(steps-1) rows)."""
    seqs, logp = torch.tensor([prompt]), torch.zeros(1)
    marginals = []
    with torch.no_grad():
        for _ in range(steps):
            lp = model(seqs)[:, -1].double().log_softmax(-1)  # (n, V)
            joint = logp[:, None] + lp
            marginals.append(joint.exp().sum(0))
            seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(len(seqs))[:, None]], 1)
            logp = joint.flatten()
    return marginals


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, cells with expected count < 5 merged into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2))  # the chi2 survival function


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_sampled_speculative_follows_the_main_models_distribution(model_and_data, method):
    model, prompts = model_and_data
    prompt, n = prompts[2], 400
    marginals = exact_marginals(model, prompt, 3)
    engine = Engine(model, max_batch=64, max_model_len=16, speculative=method, num_speculative_tokens=2,
                    prompt_lookup=(1, 2), overlap=method == "mtp")
    out = run(engine, [prompt] * n, SamplingParams(max_new_tokens=3, temperature=1.0, top_p=1.0, seed=None))
    stats = engine.speculation_stats()
    assert 0 < stats["accepted"][0] < stats["proposed"][0]
    for k in range(3):  # token 1 is the prefill's; 2 and 3 come from kept drafts, residual draws and new tokens
        counts = torch.bincount(torch.tensor([o[k] for o in out]), minlength=V)
        assert chi_square_p(counts, marginals[k]) > 1e-3, f"token {k + 1}: {counts.tolist()}"


def test_bad_speculative_requests_get_one_clear_error(model_and_data):
    model, prompts = model_and_data
    with pytest.raises(UserError, match="MTP modules"):
        Engine(build_model(CFG.replace(num_nextn_predict_layers=0)), speculative="mtp")
    with pytest.raises(UserError, match="engine runs without it"):
        Engine(model, max_model_len=32).add_request(prompts[0], SamplingParams(speculative=True))
    engine = Engine(model, max_model_len=32, speculative="mtp")
    with pytest.raises(UserError, match="not available from an engine running speculative"):
        engine.add_request(prompts[0], SamplingParams(logprobs=2))
    with pytest.raises(UserError, match="more than the engine"):
        engine.add_request(prompts[0], SamplingParams(num_speculative_tokens=2))


def test_generate_cli_with_speculative_mtp_prints_the_same_text(tmp_path, model_dir, tiny_config, capsys):
    import shutil

    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.cli import main

    plain_dir = model_dir
    path = tmp_path / "mtp"
    torch.manual_seed(0)
    save_pretrained(build_model(tiny_config(320).replace(num_nextn_predict_layers=1)), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(plain_dir / name, path / name)
    args = ["generate", str(path), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--speculative", "mtp", "--num-speculative-tokens", "2"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "drafts kept per position" in spec.err


def test_bench_speculative_runs_from_the_command_line(model_dir, tmp_path, capsys):
    """The benchmark users run (it once lacked an argument the loader reads and failed on the GPU)."""
    import shutil

    from dsmoe import load_pretrained, save_pretrained
    from dsmoe.cli import main
    from dsmoe.model.transformer import build_model

    config = load_pretrained(model_dir).config.replace(num_nextn_predict_layers=1)
    folder = tmp_path / "mtp"
    save_pretrained(build_model(config), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(argv):\n    return sum(int(a) for a in argv) + len(argv)\n" * 8)
    assert main(["bench", "speculative", str(folder), "--prompts", str(prompts), "--batch-sizes", "1",
                 "--num-speculative-tokens", "1", "--new-tokens", "4", "--prompt-len", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mtp x1" in out and "ngram x1" in out and "plain" in out  # both methods for a model with MTP


def test_generate_cli_with_prompt_lookup_prints_the_same_text_on_a_model_without_mtp(model_dir, capsys):
    from dsmoe.cli import main

    args = ["generate", str(model_dir), "--prompt", "for x in xs: print(x)\nfor x in xs:", "--max-new-tokens", "16",
            "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--speculative", "ngram", "--prompt-lookup-min", "1"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "speculative (ngram): " in spec.err and "tokens per step" in spec.err
    assert main(args + ["--speculative", "mtp"]) == 2
    assert "--speculative ngram" in capsys.readouterr().err  # no MTP modules: the error names the other method


def reference_lookup(tokens: list[int], lo: int, hi: int, N: int) -> list[int]:
    """The most recent earlier occurrence of the last n tokens (longest n first) that N tokens follow, else the
    most recent one, by plain list comparison."""
    for ahead in (N, 1):
        for n in range(min(hi, len(tokens) - ahead), lo - 1, -1):
            for i in range(len(tokens) - ahead - n, -1, -1):
                if tokens[i:i + n] == tokens[-n:]:
                    return tokens[i + n:i + n + N]
    return []


def test_prompt_lookup_finds_the_latest_longest_match_on_token_boundaries():
    """Token values whose int32 bytes also match across token boundaries (1 = 01 00 00 00 inside 256 = 00 01 00
    00 followed by 0 ...): the byte search must only take matches that start on a token."""
    from types import SimpleNamespace

    from dsmoe.infer.drafters import PromptLookupDrafter

    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0, 1, 256, 65536, 16777216, 257])
    drafter = PromptLookupDrafter(SimpleNamespace(N=3), 1, 3)
    misaligned = 0
    for i in range(400):
        tokens = values[torch.randint(0, len(values), (int(torch.randint(1, 30, (1,), generator=g)),),
                                      generator=g)].tolist()
        cut = int(torch.randint(0, len(tokens), (1,), generator=g)) + 1  # prompt / output split: the same sequence
        req = SimpleNamespace(id=f"r{i}", slot=0, prompt=tokens[:cut], output=tokens[cut:])
        assert drafter.lookup(req) == reference_lookup(tokens, 1, 3, 3), tokens
        raw = bytes(drafter.history[0][1])
        misaligned += any(raw.startswith(raw[-4:], k) for k in range(len(raw) - 4) if k % 4)
    assert misaligned > 50  # the byte-level false matches were there to be skipped
    req.output = req.output + [1, 1]  # the history grows in place as the request's output does
    assert drafter.lookup(req) == reference_lookup(req.prompt + req.output, 1, 3, 3)
    loop = SimpleNamespace(id="loop", slot=0, prompt=[7, 5, 5, 5, 5, 5], output=[])
    assert drafter.lookup(loop) == [5, 5, 5]  # a full continuation, not the one token after the latest match
    with pytest.raises(UserError, match="prompt-lookup-min"):
        PromptLookupDrafter(SimpleNamespace(N=3), 3, 2)


@pytest.mark.parametrize("drafts, temperature", [(1, 0.0), (3, 0.0), (3, 1.0)])
def test_the_device_step_leaves_its_inputs_alone(model_and_data, drafts, temperature):
    """What a CUDA-graph capture needs of the speculative step (its warm-up runs execute it before the capture):
    run twice from the same state it gives the same outputs, writes the same cache entries and staged drafts,
    and leaves the slots' positions, inputs and draft distributions as they were (commit applies them)."""
    model, prompts = model_and_data
    engine = Engine(model, max_batch=3, max_model_len=48, speculative="mtp", num_speculative_tokens=drafts)
    for p in prompts[:3]:
        engine.add_request(p, SamplingParams(max_new_tokens=20, temperature=temperature, seed=1))
    for _ in range(4):
        engine.step()
    spec, flags = engine.spec, {"any_random": temperature > 0, "any_filtered": False}
    state = lambda: [t.clone() for t in (engine.slots.positions, spec.tokens, spec.draft_probs, spec.max_drafts)]
    staged = lambda: [t.clone() for t in (spec.drafter.next_drafts, spec.drafter.next_probs,
                                          *(b for layer in (*engine.cache.layers, *spec.drafter.cache.layers)
                                            for b in layer))]
    before = state()
    spec.drafter.next_drafts.fill_(-1)
    first = [t.clone() for t in spec.compute(3, 48, spec.width, flags)]
    after_first = staged()
    second = spec.compute(3, 48, spec.width, flags)
    for a, b in zip(first + after_first + before, [*second, *staged(), *state()]):
        assert torch.equal(a, b)
    assert (after_first[0] >= 0).all() and (first[2] > before[0]).all()  # it staged drafts, positions advance
