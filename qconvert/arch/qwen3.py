"""Qwen3: the Llama block with an RMSNorm over each head of q and k before RoPE.

    q = rope(rmsnorm_head(q_proj(h)));  k = rope(rmsnorm_head(k_proj(h)))

llama.cpp: architecture ``qwen3``, q/k rows in HF order (no permutation), the per-head norms as
``attn_q_norm`` / ``attn_k_norm``.
"""

from __future__ import annotations

from functools import partial

from . import llama
from .base import Arch, T

QK_NORM_TENSORS = (
    T("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", "attn_q_norm"),
    T("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", "attn_k_norm"),
)
TENSORS = llama.TENSORS + QK_NORM_TENSORS

QWEN3 = Arch(
    name="qwen3", model_types=("qwen3",), gguf_arch="qwen3", tensors=TENSORS,
    parse_config=partial(llama.parse_config, qk_norm=True, what=" Qwen3 model"),
    gguf_kv=llama.GGUF_KV, hf_defaults={"architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu"},
    input_groups=llama.input_groups, block=llama.block, modules={"attn": llama.attention, "mlp": llama.mlp},
    extra_gguf_kv=llama.extra_gguf_kv, config_from_gguf_extra=llama.config_from_gguf,
)
