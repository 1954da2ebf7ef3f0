"""MTP modules in a fine-tune: `--mtp-layers N` gives BASE N modules (new ones drawn as build_model draws them,
extra ones dropped) and `--freeze main` trains only them, a draft head for `--speculative mtp` on a model that
ships none: BASE's weights come out bit for bit, the validation reports how often first drafts agree with the
model, and the result decodes speculatively to plain greedy's tokens."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsmoe.checkpoint.hf import load_pretrained
from dsmoe.cli import main
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--seq-len", "48", "--micro-batch", "4", "--no-progress", "--warmup-steps", "1", "--lr", "0.01"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import inspect

    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text(inspect.getsource(json) * 2)
    return path


def test_a_draft_head_trains_alone_on_a_base_without_one(model_dir, text, tmp_path, capsys):
    out = tmp_path / "head"
    assert main(["finetune", str(model_dir), "--task", "lm", "--data", str(text), "--out", str(out), "--steps", "6",
                 "--eval-interval", "3", "--mtp-layers", "1", "--freeze", "main", "--mtp-targets", "tokens",
                 *FAST]) == 0
    assert "first drafts agree" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    base, tuned = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(tuned[k], t) for k, t in base.items())  # the main model, bit for bit
    new = [k for k in tuned if k not in base]
    assert new and all(k.startswith("model.layers.2.") for k in new)  # the hub's layer num_hidden_layers
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert len({r["val_loss"] for r in evals}) == 1 and evals[-1]["val_mtp_loss"] < evals[0]["val_mtp_loss"]
    model = load_pretrained(out).eval()
    prompts = [[5, 9, 11, 5, 9], [3, 4]]
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    assert generate(model, prompts, greedy, speculative="mtp") == generate(model, prompts, greedy)


def test_fewer_mtp_layers_drop_modules_and_bad_combinations_are_one_error(model_dir, text, tmp_path, capsys):
    from dsmoe.checkpoint.hf import save_pretrained

    two = tmp_path / "two"
    model = load_pretrained(model_dir)
    torch.manual_seed(0)
    from dsmoe.model.mtp import set_mtp_depth

    set_mtp_depth(model, 2)
    save_pretrained(model, two)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (two / name).write_bytes((model_dir / name).read_bytes())
    out = tmp_path / "one"
    assert main(["finetune", str(two), "--task", "lm", "--data", str(text), "--out", str(out), "--steps", "1",
                 "--mtp-layers", "1", *FAST]) == 0
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert len(load_pretrained(out).mtp) == 1
    capsys.readouterr()
    bad = {(model_dir, "classify", "--mtp-layers", "1"): "for --task sft and lm",
           (two, "classify", "--freeze", "main"): "for --task sft and lm",  # BASE's MTP modules: not a classifier's
           (model_dir, "lm", "--mtp-layers", "1", "--lora-rank", "2"): "new modules train in full",
           (model_dir, "lm", "--freeze", "main"): "--freeze main trains only the MTP modules",
           (two, "lm", "--freeze", "main", "--mtp-loss-weight", "0"): "a positive --mtp-loss-weight"}
    for (base, task, *flags), message in bad.items():
        assert main(["finetune", str(base), "--task", task, "--data", str(text), "--out", str(tmp_path / "bad"),
                     *flags, *FAST]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_validation_draft_agreement_is_the_first_drafts_that_match_the_model(model_dir, tmp_path):
    """evaluate_windows' MTP numbers against a direct computation of what they say."""
    import torch.nn.functional as F

    from dsmoe.model.mtp import set_mtp_depth
    from dsmoe.tasks.perplexity import evaluate_windows

    model = load_pretrained(model_dir).eval()
    torch.manual_seed(1)
    set_mtp_depth(model, 2)
    g = np.random.default_rng(0)
    windows = [g.integers(0, model.config.vocab_size, 17) for _ in range(5)]
    got = evaluate_windows(model, windows, batch_size=2, device=torch.device("cpu"), drafts=True)
    ids = torch.from_numpy(np.stack(windows))
    with torch.no_grad():
        logits, (d1, d2) = model(ids[:, :-1], with_mtp=True)
    targets = ids[:, 1:]
    agree = (d1[:, :-1].argmax(-1) == logits[:, 1:].argmax(-1)).float().mean()
    depth_losses = [F.cross_entropy(d[:, :-k].flatten(0, 1), targets[:, k:].flatten()) for k, d in ((1, d1), (2, d2))]
    assert got["draft_agreement"] == pytest.approx(float(agree))
    assert got["mtp_loss"] == pytest.approx(float(sum(depth_losses) / 2), rel=1e-5)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), targets.flatten())), rel=1e-5)
    assert "draft_agreement" not in evaluate_windows(model, windows, batch_size=2, device=torch.device("cpu"))


def test_self_distilled_draft_heads_learn_the_models_distribution(model_dir, text, tmp_path):
    """--mtp-targets model (--freeze main's default) reaches the loss: at the first step (the same weights and
    batch) the logged MTP loss is the soft cross-entropy against the model ahead, not the token loss."""
    losses = {}
    for targets, flags in (("tokens", ["--mtp-targets", "tokens"]), ("model", [])):
        out = tmp_path / targets
        assert main(["finetune", str(model_dir), "--task", "lm", "--data", str(text), "--out", str(out), "--steps",
                     "1", "--log-interval", "1", "--mtp-layers", "1", "--freeze", "main", *flags, *FAST]) == 0
        first = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "mtp_loss" in r)
        losses[targets] = first["mtp_loss"]
        assert json.loads((out / "train_config.json").read_text())["mtp_targets"] == targets
    assert losses["tokens"] != pytest.approx(losses["model"], rel=1e-3)


@pytest.mark.parametrize("case", ["v2_greedy", "v3_noaux_groups_bias"])
def test_a_checkpoint_with_an_added_draft_head_still_loads_in_transformers(case, tmp_path):
    """DeepSeek-V2 has no MTP: a V2 folder with a draft head added (layer num_hidden_layers in the hub layout) still
    loads in transformers, which ignores those keys, with the model's logits; dsmoe loads it back with the head."""
    pytest.importorskip("transformers")
    from test_hf_parity import assert_logits_close, make_hf_model
    from transformers import AutoModelForCausalLM

    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.model.mtp import set_mtp_depth

    make_hf_model(case).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    torch.manual_seed(0)
    set_mtp_depth(model, 1)
    save_pretrained(model, tmp_path / "draft")
    ids = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids))
    again = load_pretrained(tmp_path / "draft")
    assert len(again.mtp) == 1 and torch.equal(again.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
