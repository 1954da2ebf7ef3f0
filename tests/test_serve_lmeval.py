"""lm-eval's `local-completions` model scores a multiple-choice task through `dsmoe serve` the way it scores
likelihood tasks (token-id prompts, echo: true, logprobs: 1, max_tokens: 1); every loglikelihood and
is-greedy flag it reports equals the one computed from the model directly. The task is a local JSONL file
(nothing is downloaded)."""

import json

import pytest
import torch

from dsmoe.checkpoint.hf import load_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'dsmoe[eval]')")

DOCS = [
    {"question": "def add(a, b):", "choices": ["\n    return a + b", "\n    pass", " print(a)"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", " json"], "answer": 1},
    {"question": "for i in range(10):", "choices": ["\n    print(i)", " break"], "answer": 0},
    {"question": "class Parser(object):", "choices": ["\n    pass", "\n    def __init__(self):"], "answer": 1},
]
TASK = """task: dsmoe_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_local_completions_scores_like_the_model(model_dir, serve, tmp_path_factory, monkeypatch):
    tasks = tmp_path_factory.mktemp("lmeval_tasks")
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "dsmoe_tiny_choice.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    with serve(model_dir, tmp_path_factory.mktemp("log") / "serve.log") as server:
        lm = LocalCompletionsAPI(model="tiny", base_url=server.url + "/v1/completions", tokenizer_backend="huggingface",
                                 tokenizer=str(model_dir), tokenized_requests=True, max_length=256, max_retries=1,
                                 num_concurrent=1)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        results = simple_evaluate(model=lm, tasks=["dsmoe_tiny_choice"], task_manager=manager, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = results["samples"]["dsmoe_tiny_choice"]
    assert len(samples) == len(DOCS)
    model = load_pretrained(model_dir).eval()
    correct = 0
    for sample in samples:
        scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont]))[0, :-1].log_softmax(-1)[len(ctx) - 1:]
            target = torch.tensor(cont)
            expected = logp.gather(-1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == target).all())
            (loglikelihood, is_greedy), = resp
            assert loglikelihood == pytest.approx(expected, abs=1e-3)
            assert is_greedy == greedy
            scores.append(expected)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == sample["target"])
    assert results["results"]["dsmoe_tiny_choice"]["acc,none"] == pytest.approx(correct / len(DOCS))
