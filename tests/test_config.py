import pytest

from dsmoe.config import ConfigError, ModelConfig
from dsmoe.presets import PRESETS, get_preset

V3_HUB = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
          "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
          "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
          "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
          "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
          "scoring_func": "sigmoid", "rope_theta": 10000, "max_position_embeddings": 163840,
          "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                           "original_max_position_embeddings": 4096, "type": "yarn"},
          "rms_norm_eps": 1e-06, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
          "num_nextn_predict_layers": 1, "quantization_config": {"fmt": "e4m3", "weight_block_size": [128, 128]}}


def test_real_v3_config_maps_one_to_one():
    c = ModelConfig.from_hf_dict(V3_HUB)
    assert c == PRESETS["deepseek-v3"]
    assert round(c.softmax_scale, 6) == 0.135234  # 192^-0.5 * mscale(40, 1.0)^2 (spec 6.4)


def test_transformers5_rope_parameters_spelling_is_equivalent():
    hub = dict(V3_HUB)
    scaling = hub.pop("rope_scaling")
    scaling["rope_type"] = scaling.pop("type")
    hf5 = {**hub, "rope_parameters": {"rope_theta": hub.pop("rope_theta"), **scaling}}
    assert ModelConfig.from_hf_dict(hf5) == ModelConfig.from_hf_dict(V3_HUB)


def test_v2_lite_softmax_scale_from_yarn_mscale():
    assert round(PRESETS["deepseek-v2-lite"].softmax_scale, 6) == 0.114721


@pytest.mark.parametrize("name", list(PRESETS))
def test_hub_dict_round_trip(name):
    c = PRESETS[name]
    hf = c.to_hf_dict()
    assert "rope_parameters" not in hf and "rope_theta" in hf  # the hub spelling
    assert ModelConfig.from_hf_dict(hf) == c


@pytest.mark.parametrize("name, total, active", [
    ("deepseek-moe-16b", 16.38e9, 2.83e9), ("deepseek-v2-lite", 15.71e9, 2.66e9),
    ("deepseek-v2", 235.7e9, 21.4e9), ("deepseek-v3", 671.0e9, 37.55e9)])
def test_real_shapes_have_the_published_parameter_counts(name, total, active):
    c = PRESETS[name]
    assert c.num_params() == pytest.approx(total, rel=2e-3)
    assert c.num_params(active=True) == pytest.approx(active, rel=2e-3)


def test_tiny_and_small_sizes():
    tiny, small = PRESETS["tiny"], PRESETS["small"]
    assert 10e6 <= tiny.num_params() <= 30e6 and tiny.use_mla and tiny.topk_method == "noaux_tc"
    assert tiny.n_routed_experts >= 16
    assert 0.9e9 <= small.num_params() <= 1.4e9 and 0.15e9 <= small.num_params(active=True) <= 0.3e9


@pytest.mark.parametrize("change, field", [
    (dict(num_experts_per_tok=17, n_routed_experts=16), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(scoring_func="softmax"), "topk_method"),  # noaux_tc needs sigmoid
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(model_type="llama"), "model_type"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        PRESETS["tiny"].replace(**change)


def test_unknown_model_type_in_config_json():
    with pytest.raises(ConfigError, match="model_type 'mixtral'"):
        ModelConfig.from_hf_dict({"model_type": "mixtral"})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("tinyy")


def test_moe_layer_selection():
    c = PRESETS["tiny"].replace(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert c.moe_layer_ids == [2, 4]
