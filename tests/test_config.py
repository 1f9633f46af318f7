"""Configs: the released checkpoints' config files give the presets; counts match the published sizes."""

from __future__ import annotations

import pytest

from herd.config import PRESETS, ConfigError, from_hf_config, from_meta_params, to_hf_text_config

# The text_config of meta-llama/Llama-4-Scout-17B-16E's config.json as released (transformers 4.51).
SCOUT_HF_TEXT = {
    "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
    "no_rope_layers": [], "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
    "num_key_value_heads": 8, "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
}
MAVERICK_HF_TEXT = {
    **SCOUT_HF_TEXT, "interleave_moe_layer_step": 2, "num_local_experts": 128, "use_qk_norm": False,
    "rope_scaling": None, "max_position_embeddings": 1048576, "moe_layers": list(range(1, 48, 2)),
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)],
}
VISION_HF = {
    "hidden_size": 1408, "image_size": 336, "intermediate_size": 5632, "model_type": "llama4_vision_model",
    "num_attention_heads": 16, "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000,
}
# Meta's params.json of the same releases (llama-models ModelArgs fields).
VISION_META = {"image_size": {"height": 336, "width": 336}, "patch_size": {"height": 14, "width": 14},
               "dim": 1408, "n_layers": 34, "n_heads": 16, "mlp_ratio": 4.0, "output_dim": 4096,
               "pixel_shuffle_ratio": 0.5}
SCOUT_META = {
    "dim": 5120, "n_layers": 48, "n_heads": 40, "n_kv_heads": 8, "vocab_size": 202048, "multiple_of": 2048,
    "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
    "use_qk_norm": True, "attention_chunk_size": 8192, "nope_layer_interval": 4, "attn_temperature_tuning": True,
    "floor_scale": 8192, "attn_scale": 0.1, "vision_args": VISION_META,
    "moe_args": {"num_experts": 16, "capacity_factor": 1.0, "auto_scale_F": True, "top_k": 1,
                 "interleave_moe_layer_step": 1},
}
MAVERICK_META = {**SCOUT_META, "use_scaled_rope": False, "use_qk_norm": False,
                 "moe_args": {**SCOUT_META["moe_args"], "num_experts": 128, "interleave_moe_layer_step": 2}}


def _hf(text):
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
            "vision_config": VISION_HF, "boi_token_index": 200080, "eoi_token_index": 200081,
            "image_token_index": 200092, "tie_word_embeddings": False}


@pytest.mark.parametrize("name, hf, meta", [("scout", SCOUT_HF_TEXT, SCOUT_META),
                                            ("maverick", MAVERICK_HF_TEXT, MAVERICK_META)])
def test_released_configs_give_the_presets(name, hf, meta):
    want = PRESETS[name].text
    assert from_hf_config(_hf(hf)).text == want
    assert from_hf_config(hf).text == want  # the text-only (Llama4ForCausalLM) form
    got = from_meta_params(meta).text
    # params.json does not carry the advertised context length; everything else must agree.
    assert got == type(want)(**{**want.__dict__, "max_seq_len": got.max_seq_len})
    assert from_hf_config(_hf(hf)).vision == PRESETS[name].vision == from_meta_params(meta).vision


@pytest.mark.parametrize("name, total, active", [("scout", 109e9, 17e9), ("maverick", 400e9, 17e9)])
def test_param_counts_match_published_sizes(name, total, active):
    cfg = PRESETS[name]
    assert abs(cfg.param_count() / total - 1) < 0.02
    assert abs(cfg.param_count(active=True) / active - 1) < 0.02


def test_maverick_bf16_size_matches_metas_shard_sizes():
    # llama-models' sku_list: Maverick's 8 consolidated shards are 100,458,118,386 bytes each (bf16).
    assert abs(PRESETS["maverick"].param_count() * 2 / (8 * 100_458_118_386) - 1) < 0.002


def test_behemoth_is_marked_as_estimate():
    b = PRESETS["behemoth"]
    assert "ESTIMATE" in b.note
    assert abs(b.param_count(active=True) / 288e9 - 1) < 0.02
    assert abs(b.param_count() / 2e12 - 1) < 0.02


def test_layer_layout():
    s, m = PRESETS["scout"].text, PRESETS["maverick"].text
    assert [i for i, r in enumerate(s.uses_rope) if not r] == list(range(3, 48, 4))
    assert all(s.is_moe) and m.is_moe == tuple(i % 2 == 1 for i in range(48))


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-interleaved", "tiny-dense", "scout", "maverick"])
def test_hf_round_trip(name):
    t = PRESETS[name].text
    assert from_hf_config(to_hf_text_config(t)).text == t


@pytest.mark.parametrize("change, message", [
    ({"n_kv_heads": 3}, "must be a multiple of n_kv_heads"),
    ({"dim": 5121}, "not a multiple of n_heads"),
    ({"vocab_size": None}, "'vocab_size' is missing"),
    ({"moe_args": {"num_experts": 4, "top_k": 5}}, "top_k must be in"),
    ({"moe_args": {"num_experts": 4, "experts_per_tok": 1}}, r"unknown field\(s\) in moe_args"),
    ({"n_layer": 3}, r"unknown field\(s\) \['n_layer'\]"),
    ({"attention_chunk_size": 0}, "attention_chunk_size must be >= 1"),
])
def test_bad_meta_params(change, message):
    with pytest.raises(ConfigError, match=message):
        from_meta_params({**SCOUT_META, **change})
