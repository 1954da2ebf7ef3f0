"""lm-eval's `dsmoe` model (in process) against lm-eval's `hf` model (transformers loading the same folder),
on local YAML tasks over the shared data: the same accuracy, bits-per-byte within 1e-3 relative, the same
per-request loglikelihoods and the same greedy generations."""

import json

from shared_data import SHARED_DATA as SHARED
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'dsmoe[eval]')")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not (SHARED / "rt_polarity_test.jsonl").is_file(),
                                reason=f"the shared data folder {SHARED} is missing (set DSMOE_SHARED_DATA)")]

TASKS = {
    "dsmoe_rt_polarity_mc": """
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/rt_polarity_test.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{['negative', 'positive'].index(label)}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "dsmoe_rt_polarity_bpb": """
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/rt_polarity_test.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
""",
    "dsmoe_sms_spam_gen": """
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/sms_spam_test.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "Message: {{{{text}}}}\\nSpam or ham:"
doc_to_target: "{{{{label}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}" + body.format(data=SHARED.resolve()))
    return folder


def _evaluate(model, model_args, task_dir, monkeypatch, tmp_path):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), limit=6, log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


@pytest.mark.slow
def test_dsmoe_model_scores_like_hf(tmp_path_factory, model_dir, task_dir, monkeypatch):
    import dsmoe.tasks.lm_eval_model  # noqa: F401 (registers "dsmoe")
    from lm_eval.api.registry import get_model

    assert get_model("dsmoe").__name__ == "DsmoeLM"
    tmp = tmp_path_factory.mktemp("lmeval_run")
    ours = _evaluate("dsmoe", f"pretrained={model_dir},device=cpu,dtype=float32,batch_size=4", task_dir,
                     monkeypatch, tmp)
    hf = _evaluate("hf", f"pretrained={model_dir},device=cpu,dtype=float32,batch_size=4", task_dir, monkeypatch, tmp)

    assert ours["results"]["dsmoe_rt_polarity_mc"]["acc,none"] == hf["results"]["dsmoe_rt_polarity_mc"]["acc,none"]
    assert ours["results"]["dsmoe_rt_polarity_bpb"]["bits_per_byte,none"] == pytest.approx(
        hf["results"]["dsmoe_rt_polarity_bpb"]["bits_per_byte,none"], rel=1e-3)
    for task in ("dsmoe_rt_polarity_mc", "dsmoe_rt_polarity_bpb"):
        for a, b in zip(ours["samples"][task], hf["samples"][task], strict=True):
            assert a["arguments"] == b["arguments"]
            ll_ours = torch.tensor([[float(x) for x in r[0]] if isinstance(r[0], (list, tuple)) else [float(r[0])]
                                    for r in a["resps"]])
            ll_hf = torch.tensor([[float(x) for x in r[0]] if isinstance(r[0], (list, tuple)) else [float(r[0])]
                                  for r in b["resps"]])
            torch.testing.assert_close(ll_ours, ll_hf, rtol=1e-4, atol=1e-3)
    gen_ours = [s["resps"] for s in ours["samples"]["dsmoe_sms_spam_gen"]]
    gen_hf = [s["resps"] for s in hf["samples"]["dsmoe_sms_spam_gen"]]
    assert gen_ours == gen_hf
    assert ours["results"]["dsmoe_sms_spam_gen"]["exact_match,none"] == \
        hf["results"]["dsmoe_sms_spam_gen"]["exact_match,none"]


@pytest.mark.slow
def test_dsmoe_eval_lm_eval_from_the_command_line(tmp_path_factory, task_dir, model_dir, monkeypatch, capsys):
    from dsmoe.cli import main

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cli")))
    out = tmp_path_factory.mktemp("lmeval_cli")
    assert main(["eval", str(model_dir), "--lm-eval", "dsmoe_rt_polarity_mc", "--include-path", str(task_dir),
                 "--limit", "2", "--out", str(out)]) == 0
    assert "acc,none" in json.loads((out / "results.json").read_text())["results"]["dsmoe_rt_polarity_mc"]
    assert "dsmoe_rt_polarity_mc" in capsys.readouterr().out
    assert main(["eval", str(model_dir), "--lm-eval", "no_such_task", "--include-path", str(task_dir)]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


def test_generation_keeps_lm_evals_context_length_and_refuses_no_room(model_dir, monkeypatch):
    """Contexts keep their last max_length - max_gen_toks tokens (as the hf model does); a max_gen_toks that
    leaves no room for a prompt is one clear error."""
    from lm_eval.api.instance import Instance

    import dsmoe.tasks.generation
    from dsmoe.errors import UserError
    from dsmoe.tasks.lm_eval_model import DsmoeLM

    lm = DsmoeLM(str(model_dir), device="cpu", dtype="float32", batch_size=2, max_length=24)
    context = " ".join(f"w{i}" for i in range(200))
    seen = []
    generate = dsmoe.tasks.generation.generate_texts
    monkeypatch.setattr(dsmoe.tasks.generation, "generate_texts",
                        lambda model, tok, prompts, **kw: seen.extend(prompts) or generate(model, tok, prompts, **kw))
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert isinstance(text, str) and seen == [lm.tok_encode(context)[-20:]]
    with pytest.raises(UserError, match="max_gen_toks=24 leaves no room"):
        lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 24}), 0)])
