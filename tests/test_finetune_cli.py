"""`dsmoe finetune` end to end on a tiny model: outputs other tools load, exact resume, aux-free bias, and bad
input that leaves nothing in --out."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dsmoe.cli import main

FAST = ["--seq-len", "48", "--micro-batch", "4", "--eval-interval", "100", "--no-progress", "--warmup-steps", "1"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base(model_dir):
    return model_dir


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def spam(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = [{"text": f"win a prize now {i}", "label": "spam"} if i % 3 == 0 else
            {"text": f"see you at lunch {i}", "label": "ham"} for i in range(24)]
    return write(folder / "train.jsonl", rows), write(folder / "test.jsonl", rows[:9])


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chats")
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(16)]
    return write(folder / "train.jsonl", rows)


def test_classify_lora_writes_a_peft_adapter_and_merge_writes_a_classifier(base, spam, tmp_path, capsys):
    train, test = spam
    out = tmp_path / "cls"
    assert main(["finetune", str(base), "--task", "classify", "--data", str(train), "--eval-data", str(test),
                 "--out", str(out), "--steps", "3", "--lora-rank", "2", "--merge", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and "majority class 0.6667" in printed
    assert "train.jsonl: 24 examples" in printed
    lora_line = next(line for line in printed.splitlines() if "LoRA r=2" in line)
    assert "kv_b_proj" in lora_line and "v_proj," not in lora_line  # the modules this MLA model has
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["mlp.gate", "score"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"}
    assert "score.weight" in load_file(out / "model.safetensors")
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    from dsmoe import load_pretrained
    from dsmoe.errors import CheckpointError

    with pytest.raises(CheckpointError, match="classifier adapter"):  # its labels are not in the adapter
        load_pretrained(out / "adapter")


def test_sft_resume_is_exact_and_the_router_bias_moves_unless_frozen(base, chats, tmp_path, capsys):
    args = ["finetune", str(base), "--task", "sft", "--data", str(chats), "--steps", "4", "--checkpoint-interval",
            "2", "--bias-update-gamma", "0.01", *FAST]
    lora = ["--lora-rank", "2", "--merge"]  # the checkpoint holds factors, router and biases; the rest is BASE's
    assert main([*args, *lora, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, *lora, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    step_2 = tmp_path / "split" / "checkpoints" / "step_2"
    saved = [k for f in step_2.glob("*.safetensors") for k in safe_open(f, "pt").keys() if k.startswith("model.")]
    assert not any(k.endswith("original") for k in saved) and any("lora_A" in k for k in saved)
    assert main(["finetune", "--resume", str(tmp_path / "split"), "--no-progress"]) == 0
    whole, split = (load_file(tmp_path / n / "model.safetensors") for n in ("whole", "split"))
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    start = load_file(base / "model.safetensors")
    bias = [k for k in whole if k.endswith("e_score_correction_bias")]
    assert bias and any(not torch.equal(whole[k], start[k]) for k in bias)  # aux-free updates carried over
    # the adapter folder itself loads as the merged model: base + folded factors + trained routers and biases
    from dsmoe import load_pretrained

    from_adapter = load_pretrained(tmp_path / "whole" / "adapter").state_dict()
    assert from_adapter.keys() == load_pretrained(tmp_path / "whole").state_dict().keys()
    for key, value in load_pretrained(tmp_path / "whole").state_dict().items():
        assert torch.equal(from_adapter[key], value), key

    assert main([*args, *lora, "--out", str(tmp_path / "frozen"), "--freeze", "router"]) == 0
    frozen = load_file(tmp_path / "frozen" / "model.safetensors")
    for key in bias + [k.replace("e_score_correction_bias", "weight") for k in bias]:
        assert torch.equal(frozen[key], start[key]), key
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("maxvio") for r in lines)

    options = tmp_path / "split" / "finetune_config.json"  # as an older dsmoe wrote it: no checkpoint_format
    older = {k: v for k, v in json.loads(options.read_text()).items() if k != "checkpoint_format"}
    options.write_text(json.dumps(older))
    capsys.readouterr()
    assert main(["finetune", "--resume", str(tmp_path / "split"), "--no-progress"]) != 0
    assert "written by an older dsmoe" in capsys.readouterr().err


def test_start_and_end_lines_read_right(base, spam, tmp_path, capsys):
    """Full fine-tuning printed "7.14M of 7.1M parameters train" (two precisions: more trained than there are),
    and the resume of a finished run "done: 2 steps in 0s (real tokens, padding excluded)" with no speed."""
    import re

    train, _ = spam
    out = tmp_path / "full"
    assert main(["finetune", str(base), "--task", "classify", "--data", str(train), "--out", str(out), "--steps",
                 "2", *FAST]) == 0
    trained, total = re.search(r"([\d.]+)M of ([\d.]+)M parameters train", capsys.readouterr().out).groups()
    assert trained == total  # a classifier trains every weight it has
    from dsmoe.tasks.eval_tasks import fine_tuned_text_tokens

    assert fine_tuned_text_tokens(out) == 48  # dsmoe eval reads its texts cut where training cut them
    assert main(["finetune", "--resume", str(out), "--no-progress"]) == 0
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done:"))
    assert "padding" not in done


def test_an_adapter_peft_cannot_load_is_not_announced_as_peft_layout_alone(base, chats, tmp_path, capsys):
    """LoRA on the dense MLPs / shared experts loads in dsmoe but not in PEFT (README): the end line said only
    "adapter (PEFT layout)"."""
    assert main(["finetune", str(base), "--task", "sft", "--data", str(chats), "--out", str(tmp_path / "mlp"),
                 "--steps", "1", "--lora-rank", "2", "--lora-targets", "mlp", *FAST]) == 0
    output = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("output:"))
    assert "PEFT cannot" in output and "--merge" in output


def test_a_classifier_adapter_says_dsmoe_evaluates_it_after_merge(base, spam, tmp_path, capsys):
    train, _ = spam
    assert main(["finetune", str(base), "--task", "classify", "--data", str(train), "--out", str(tmp_path / "cls"),
                 "--steps", "1", "--lora-rank", "2", *FAST]) == 0
    output = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("output:"))
    assert "after --merge" in output and "PEFT cannot" not in output


def test_base_after_data_is_named_as_the_mistake(base, spam, capsys):
    train, _ = spam
    assert main(["finetune", "--task", "classify", "--data", str(train), str(base)]) == 2
    assert "put BASE before --data" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["malformed", "no_assistant", "bad_label", "one_label", "bad_base"])
def test_bad_input_is_one_clear_error_and_leaves_no_output_folder(base, spam, tmp_path, capsys, case):
    train, _ = spam
    bad = tmp_path / "bad.jsonl"
    task, data, eval_data, base_path, expected = "classify", train, None, base, ""
    if case == "malformed":
        bad.write_text(train.read_text() + "{oops\n")
        data, expected = bad, "bad.jsonl:25: not valid JSON"
    elif case == "no_assistant":
        write(bad, [{"messages": [{"role": "user", "content": "hi"}]}])
        task, data, expected = "sft", bad, "bad.jsonl:1: the conversation has no assistant turn"
    elif case == "one_label":
        write(bad, [{"text": f"x {i}", "label": "ham"} for i in range(4)])
        data, expected = bad, "every training record has the label 'ham'"
    elif case == "bad_label":
        write(bad, [{"text": "x", "label": "eggs"}])
        eval_data, expected = bad, "bad.jsonl:1: label 'eggs' is not in the label set"
    else:
        base_path, expected = tmp_path / "nowhere", "no config.json in"
    out = tmp_path / "out"
    argv = ["finetune", str(base_path), "--task", task, "--data", str(data), "--out", str(out), *FAST]
    assert main(argv + (["--eval-data", str(eval_data)] if eval_data else [])) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("error:") == 1 and "Traceback" not in err
    assert not out.exists()


def test_several_data_files_are_one_training_set(base, spam, tmp_path, capsys):
    train, test = spam
    more = write(tmp_path / "more.jsonl", [{"text": "claim your free reward", "label": "spam"}] * 5)
    assert main(["finetune", str(base), "--task", "classify", "--data", str(train), str(more), "--eval-data", str(test),
                 "--out", str(tmp_path / "two"), "--steps", "1", *FAST]) == 0
    assert f"{train}, {more}: 29 examples" in capsys.readouterr().out
    saved = json.loads((tmp_path / "two" / "finetune_config.json").read_text())
    assert saved["data"] == [str(train), str(more)]

    out = tmp_path / "older"  # a fine-tune saved when --data took one file (a string) resumes
    assert main(["finetune", str(base), "--task", "classify", "--data", str(train), "--out", str(out), "--steps", "2",
                 "--checkpoint-interval", "1", "--stop-after", "1", *FAST]) == 0
    options = json.loads((out / "finetune_config.json").read_text())
    (out / "finetune_config.json").write_text(json.dumps({**options, "data": str(train)}))
    assert main(["finetune", "--resume", str(out), "--no-progress"]) == 0


def test_resume_runs_from_any_folder_and_refuses_new_fine_tuning_options(base, spam, tmp_path, capsys, monkeypatch):
    train, _ = spam
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "train.jsonl").write_text(train.read_text())
    base_link = tmp_path / "work" / "base"
    base_link.symlink_to(base)
    args = ["finetune", "base", "--task", "classify", "--data", "train.jsonl", "--steps", "2", "--out", "run", *FAST]
    assert main([*args, "--stop-after", "1"]) == 0  # relative BASE, --data and --out
    run = tmp_path / "work" / "run"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--merge", "--no-progress"]) == 2
    assert "drop --merge" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(run), "--no-progress"]) == 0  # another folder: the paths still hold
    assert json.loads((run / "finetune_config.json").read_text())["data"] == [str(run.parent / "train.jsonl")]


@pytest.mark.parametrize("alpha", ["0", "-4", "nan"])
def test_a_lora_alpha_that_scales_the_update_away_is_refused(base, spam, tmp_path, capsys, alpha):
    argv = ["finetune", str(base), "--task", "classify", "--data", str(spam[0]), "--lora-rank", "2",
            "--lora-alpha", alpha, "--out", str(tmp_path / "out"), *FAST]
    assert main(argv) == 2 and "--lora-alpha" in capsys.readouterr().err
