"""The formats other tools load: a dsmoe LoRA adapter through peft.PeftModel on transformers' model, and a
classifier folder through transformers' DeepseekV3ForSequenceClassification, with equal logits."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dsmoe.checkpoint.hf import CheckpointError, save_pretrained  # noqa: E402
from dsmoe.checkpoint.peft_adapter import load_adapter, save_adapter  # noqa: E402
from dsmoe.finetune.classifier import classifier_from_base, lengths_of  # noqa: E402
from dsmoe.finetune.lora import LoRASpec, apply_lora, lora_factors, merge_lora  # noqa: E402
from dsmoe.model.transformer import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = LoRASpec(rank=2, alpha=3, targets=("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                          "o_proj", "experts"))
IDS = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(3))


def base_dir(tmp_path, tiny_config, **changes):
    torch.manual_seed(0)
    model = build_model(tiny_config(64).replace(pad_token_id=1, **changes), dtype=torch.float32)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    save_pretrained(model, tmp_path / "base")
    return model, tmp_path / "base"


def adapt(model, seed=1):
    apply_lora(model, SPEC)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, delta in lora_factors(model):
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=g) * 0.3)
        for moe in model.moe_layers():  # a trained router travels as modules_to_save
            moe.gate.weight.add_(torch.randn(moe.gate.weight.shape, generator=g) * 0.05)
            moe.gate.e_score_correction_bias.add_(0.01)


def router_tensors(model):
    out = {}
    for i, block in enumerate(model.layers):
        if hasattr(block.mlp, "gate") and hasattr(block.mlp.gate, "e_score_correction_bias"):
            out[f"layers.{i}.mlp.gate.weight"] = block.mlp.gate.weight
            out[f"layers.{i}.mlp.gate.e_score_correction_bias"] = block.mlp.gate.e_score_correction_bias
    return out


def test_peft_loads_the_adapter_with_equal_logits_and_dsmoe_round_trips_it(tmp_path, tiny_config):
    model, base = base_dir(tmp_path, tiny_config)
    adapt(model)
    model.eval()
    with torch.no_grad():
        ours = model(IDS)
    save_adapter(model, tmp_path / "adapter", SPEC, base_model=str(base), modules_to_save=router_tensors(model))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        plain = hf(IDS).logits
        assert (plain - ours).abs().max() > 1e-2  # the adapter changes the output, so equality means something
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(IDS).logits, ours, rtol=1e-4, atol=1e-4)

    from dsmoe.checkpoint.hf import load_pretrained

    again = load_pretrained(base)
    extra = load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        for name, tensor in extra.items():
            dict(again.named_parameters(), **dict(again.named_buffers()))[name].copy_(tensor)
        torch.testing.assert_close(again.eval()(IDS), ours, rtol=1e-5, atol=1e-5)


def test_an_adapter_for_another_base_model_is_one_clear_error(tmp_path, tiny_config):
    model, base = base_dir(tmp_path, tiny_config)
    adapt(model)
    save_adapter(model, tmp_path / "adapter", SPEC, base_model=str(base))
    torch.manual_seed(0)
    wider = build_model(tiny_config(64).replace(hidden_size=96), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="adapter for another model.*has shape"):
        load_adapter(wider, tmp_path / "adapter")
    deeper = build_model(tiny_config(64).replace(num_hidden_layers=3), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="adapter for another model"):
        load_adapter(deeper, tmp_path / "adapter")


def padded_batch():
    ids = torch.randint(2, 64, (3, 9), generator=torch.Generator().manual_seed(4))
    ids[0, 6:] = 1  # right padding with pad_token_id 1
    ids[2, 3:] = 1
    return ids


def test_classifier_folder_loads_in_transformers_with_equal_logits(tmp_path, tiny_config):
    model, _ = base_dir(tmp_path, tiny_config)
    torch.manual_seed(2)
    classifier = classifier_from_base(model, ["ham", "spam", "eggs"]).eval()
    ids = padded_batch()
    with torch.no_grad():
        ours = classifier.classify(ids, lengths_of(ids, 1))
    save_pretrained(classifier, tmp_path / "cls")
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForSequenceClassification"] and config["num_labels"] == 3
    assert config["id2label"] == {"0": "ham", "1": "spam", "2": "eggs"} and config["pad_token_id"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert isinstance(hf, transformers.DeepseekV3ForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_classifier_lora_adapter_loads_in_peft_and_merges_to_the_same_logits(tmp_path, tiny_config):
    model, base = base_dir(tmp_path, tiny_config)
    torch.manual_seed(2)
    classifier = classifier_from_base(model, ["neg", "pos"])
    adapt(classifier)
    classifier.eval()
    ids = padded_batch()
    with torch.no_grad():
        ours = classifier.classify(ids, lengths_of(ids, 1))
    save_adapter(classifier, tmp_path / "adapter", SPEC, base_model=str(base), task_type="SEQ_CLS",
                 modules_to_save={"score.weight": classifier.score.weight, **router_tensors(classifier)})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=1).eval()
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-4, atol=1e-4)
        merge_lora(classifier)
        torch.testing.assert_close(classifier.classify(ids, lengths_of(ids, 1)), ours, rtol=1e-5, atol=1e-5)
