"""llama.cpp's quantization mixes for mixture-of-experts and fused-qkv models
(src/llama-quant.cpp, ``llama_tensor_get_type``): expert matrices count as their dense
category, the router stays in float, 8-expert models (Mixtral 8x7B / 8x22B) take attn_v /
attn_k in Q8_0 and attn_output in Q5_K for the low mixes; a fused attn_qkv follows attn_v."""

from __future__ import annotations

import numpy as np

from qconvert.arch import by_model_type
from qconvert.methods.mixes import MIXES, groupwise_mix, mix_type, model_shape
from qconvert.plan import plan_tensors
from qconvert.sources.base import SourceTensor


def test_eight_expert_rules():
    s8, s4, dense = model_shape(32, 32, 8, 8), model_shape(32, 32, 8, 4), model_shape(32, 32, 8)
    q4km = MIXES["q4_k_m"]
    assert mix_type(q4km, "attn_v", 5, s8) == "Q8_0" and mix_type(q4km, "attn_k", 5, s8) == "Q8_0"
    assert mix_type(MIXES["q4_0"], "attn_v", 5, s8) == "Q8_0"
    assert mix_type(q4km, "attn_output", 5, s8) == "Q5_K"
    assert mix_type(MIXES["q3_k_l"], "attn_output", 5, s8) == "Q3_K"  # no dense bump with 8 experts
    assert mix_type(MIXES["q3_k_l"], "attn_output", 5, dense) == "Q5_K"
    for role in ("attn_v", "attn_k", "attn_output"):  # only exactly 8 experts
        assert mix_type(q4km, role, 5, s4) == mix_type(q4km, role, 5, dense)
    assert mix_type(q4km, "ffn_down_exps", 0, s8) == "Q6_K" and mix_type(q4km, "ffn_down_exps", 5, s8) == "Q4_K"
    assert mix_type(groupwise_mix(4, 32), "attn_v", 0, s8) == "I4G32"  # GPTQ / AWQ: no llama.cpp bumps
    assert mix_type(q4km, "attn_qkv", 5, s8) == "Q8_0"


def test_fused_qkv_takes_attn_v_rules():
    """llama.cpp's category_is_attn_v() covers attn_qkv (Phi-3, GPT-2): use_more_bits layers get
    Q6_K in q4_k_m, the others the default; the old attn_qkv-only branch is unreachable there."""
    shape = model_shape(32, 32, 32)
    for mix in ("q2_k", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q4_0"):
        for i in (0, 3, 4, 5, 31):
            assert mix_type(MIXES[mix], "attn_qkv", i, shape) == mix_type(MIXES[mix], "attn_v", i, shape), (mix, i)
    assert [mix_type(MIXES["q4_k_m"], "attn_qkv", i, shape) for i in (0, 4, 5, 6)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K"]


def test_mixtral_plan_keeps_the_router_in_float():
    config = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8,
              "num_experts_per_tok": 2, "tie_word_embeddings": False}
    arch = by_model_type("mixtral")
    shapes = {"model.embed_tokens.weight": (512, 256), "lm_head.weight": (512, 256), "model.norm.weight": (256,)}
    for i in range(8):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (256, 256), p + "self_attn.k_proj.weight": (64, 256),
                       p + "self_attn.v_proj.weight": (64, 256), p + "self_attn.o_proj.weight": (256, 256),
                       p + "input_layernorm.weight": (256,), p + "post_attention_layernorm.weight": (256,),
                       p + "block_sparse_moe.gate.weight": (8, 256)})
        for e in range(8):
            shapes.update({p + f"block_sparse_moe.experts.{e}.w1.weight": (512, 256),
                           p + f"block_sparse_moe.experts.{e}.w3.weight": (512, 256),
                           p + f"block_sparse_moe.experts.{e}.w2.weight": (256, 512)})
    tensors = [SourceTensor(n, s, "F32", lambda: np.zeros(1, np.uint8)) for n, s in shapes.items()]
    plans = {p.name: p.type_name for p in plan_tensors(tensors, arch, config, MIXES["q4_k_m"])}
    p = "model.layers.1."
    assert plans[p + "block_sparse_moe.gate.weight"] == "F32"
    assert plans[p + "self_attn.v_proj.weight"] == plans[p + "self_attn.k_proj.weight"] == "Q8_0"
    assert plans[p + "self_attn.o_proj.weight"] == "Q5_K"
    assert plans[p + "block_sparse_moe.experts.3.w1.weight"] == "Q4_K"
    assert plans["model.layers.0.block_sparse_moe.experts.3.w2.weight"] == "Q6_K"  # use_more_bits(0, 8)
    assert plans[p + "block_sparse_moe.experts.3.w2.weight"] == "Q4_K"
