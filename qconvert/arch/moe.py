"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE -- the Llama (Qwen3) block whose MLP is a
router and a set of gated-MLP experts.

    p = softmax(router(h))                        float32, over all experts
    chosen = top_k(p)                             per token
    w = p[chosen] (/ sum p[chosen])               Mixtral always, Qwen3-MoE when norm_topk_prob
    mlp(h) = sum over chosen e of w_e * down_e(silu(gate_e(h)) * up_e(h))

as transformers 5's ``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock`` (``ops.moe_mlp``).
Each expert is its own three 2-D matrices in the container (``experts.{e}.…``), quantized one
by one; the router stays in float (role ``router``).

llama.cpp: Mixtral is the ``llama`` GGUF architecture with ``expert_count`` > 0 (q/k rows
pair-permuted as for Llama); Qwen3-MoE is ``qwen3moe`` (q/k norms, HF row order). Both store
the experts merged, one 3-D tensor per matrix kind -- ``ffn_gate_exps``, ``ffn_up_exps``,
``ffn_down_exps`` (experts along the outermost axis) -- and the router as ``ffn_gate_inp``;
both always renormalise the chosen experts' weights (``build_moe_ffn(..., norm_w = true)``),
so a Qwen3-MoE without ``norm_topk_prob`` cannot be exported to GGUF faithfully (refused).
llama.cpp's qwen3moe has experts in every layer; dense layers (``mlp_only_layers``,
``decoder_sparse_step``) run here but have no GGUF names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import numpy as np

from ..errors import QConvertError
from ..runtime.ops import rms_norm, silu
from . import llama
from .base import MAX_EXPERTS, MAX_INTERMEDIATE, Arch, Context, InputGroup, K, Layer, T, cfg_int
from .ops import moe_mlp
from .qwen3 import QK_NORM_TENSORS


@dataclass(frozen=True)
class MoeNames:
    """One family's MoE tensor names, relative to the layer; ``{e}`` is the expert."""

    router: str
    gate: str
    up: str
    down: str

    def expert(self, e: int) -> tuple[str, str, str]:
        return self.gate.format(e=e), self.up.format(e=e), self.down.format(e=e)


MIXTRAL_NAMES = MoeNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                         "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight")
QWEN3_MOE_NAMES = MoeNames("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                           "mlp.experts.{e}.down_proj.weight")


def _moe_tensors(names: MoeNames) -> tuple[T, ...]:
    full = "model.layers.{i}."
    return (
        T(full + names.router, "blk.{i}.ffn_gate_inp.weight", "router"),
        # {e} in the HF name only: llama.cpp's merged 3-D tensor, experts along the outermost axis
        T(full + names.gate, "blk.{i}.ffn_gate_exps.weight", "ffn_gate_exps"),
        T(full + names.up, "blk.{i}.ffn_up_exps.weight", "ffn_up_exps"),
        T(full + names.down, "blk.{i}.ffn_down_exps.weight", "ffn_down_exps"),
    )


MIXTRAL_TENSORS = llama.GLOBAL_TENSORS + llama.ATTENTION_TENSORS + _moe_tensors(MIXTRAL_NAMES)
# Qwen3-MoE's dense layers (mlp_only_layers) have no qwen3moe GGUF names: export refuses them
QWEN3_MOE_TENSORS = (llama.GLOBAL_TENSORS + llama.ATTENTION_TENSORS + QK_NORM_TENSORS + _moe_tensors(QWEN3_MOE_NAMES)
                     + tuple(T(t.hf, None, t.role) for t in llama.MLP_TENSORS))

EXPERT_KV = (
    K("expert_count", "num_local_experts", "n_experts", "u32"),
    K("expert_used_count", "num_experts_per_tok", "top_k", "u32"),
)
MIXTRAL_KV = llama.GGUF_KV + EXPERT_KV  # convert_hf_to_gguf writes them for any model
QWEN3_MOE_KV = llama.GGUF_KV + (
    K("expert_count", "num_experts", "n_experts", "u32"),
    K("expert_used_count", "num_experts_per_tok", "top_k", "u32"),
    K("expert_feed_forward_length", "moe_intermediate_size", "expert_size", "u32"),
)


@dataclass(frozen=True)
class MoeConfig(llama.LlamaConfig):
    n_experts: int = 0
    top_k: int = 0
    norm_topk: bool = True  # renormalise the chosen experts' probabilities to sum to 1
    expert_size: int = 0  # each expert's intermediate size
    sparse: tuple[bool, ...] = ()  # per layer: MoE (True) or a dense MLP of intermediate_size


def _moe_config(base: llama.LlamaConfig, n_experts: int, top_k: int, norm: bool, expert_size: int,
                sparse: tuple[bool, ...]) -> MoeConfig:
    return MoeConfig(**{f.name: getattr(base, f.name) for f in fields(base)}, n_experts=n_experts, top_k=top_k,
                     norm_topk=norm, expert_size=expert_size, sparse=sparse)


def _top_k(cfg: dict, n_experts: int) -> int:
    return cfg_int(cfg, "num_experts_per_tok", hi=n_experts, what=" mixture-of-experts model")


def parse_mixtral(cfg: dict) -> MoeConfig:
    base = llama.parse_config(cfg, what=" Mixtral model")
    n = cfg_int(cfg, "num_local_experts", hi=MAX_EXPERTS, what=" Mixtral model")
    # router_jitter_noise only perturbs training; the router itself always renormalises
    return _moe_config(base, n, _top_k(cfg, n), True, base.intermediate_size, (True,) * base.n_layers)


def parse_qwen3_moe(cfg: dict) -> MoeConfig:
    base = llama.parse_config(cfg, qk_norm=True, what=" Qwen3-MoE model")
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"  # transformers 5 saves the latter
    n = cfg_int(cfg, key, hi=MAX_EXPERTS, what=" Qwen3-MoE model")
    step = cfg_int(cfg, "decoder_sparse_step", 1, hi=max(base.n_layers, 1))
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise QConvertError(f"config.json mlp_only_layers is {only!r}, not a list of layer indices")
    sparse = tuple(i not in only and (i + 1) % step == 0 for i in range(base.n_layers))
    norm = cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise QConvertError(f"config.json norm_topk_prob is {norm!r}, not true or false")
    expert_size = cfg_int(cfg, "moe_intermediate_size", hi=MAX_INTERMEDIATE, what=" Qwen3-MoE model")
    return _moe_config(base, n, _top_k(cfg, n), norm, expert_size, sparse)


# --------------------------------------------------------------------------------------------
# the block


def mlp(names: MoeNames, cfg: MoeConfig, layer: Layer, h: np.ndarray, ctx: Context | None = None) -> np.ndarray:
    if not cfg.sparse[layer.index]:
        return llama.mlp(cfg, layer, h)
    return moe_mlp(layer, h, silu, names.router, [names.expert(e) for e in range(cfg.n_experts)], cfg.top_k,
                   cfg.norm_topk)


def block(names: MoeNames, cfg: MoeConfig, layer: Layer, x: np.ndarray, ctx: Context) -> np.ndarray:
    x = x + llama.attention(cfg, layer, rms_norm(x, layer.vector(llama.ATTN_NORM), cfg.rms_eps), ctx)
    return x + mlp(names, cfg, layer, rms_norm(x, layer.vector(llama.FFN_NORM), cfg.rms_eps))


def input_groups(names: MoeNames, cfg: MoeConfig, i: int) -> list[InputGroup]:
    """llama's attention groups; then norm -> every expert's gate and up, the router taking the
    same scale (``fold``), and each expert's up -> its down. Dense layers: llama's groups."""
    if not cfg.sparse[i]:
        return llama.input_groups(cfg, i)
    groups = [InputGroup(llama.ATTN_NORM, llama.QKV, module="attn")]
    if cfg.n_kv_heads == cfg.n_heads:
        groups.append(InputGroup(llama.QKV[2], (llama.O_PROJ,), prev_kind="linear"))
    experts = [names.expert(e) for e in range(cfg.n_experts)]
    groups.append(InputGroup(llama.FFN_NORM, tuple(n for g, u, _ in experts for n in (g, u)), module="mlp",
                             fold=(names.router,)))
    groups += [InputGroup(u, (d,), prev_kind="linear") for _, u, d in experts]
    return groups


# --------------------------------------------------------------------------------------------
# GGUF


def _expert_count(kv: dict) -> int:
    value = kv.get(f"{kv.get('general.architecture')}.expert_count", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def qwen3_moe_gguf_kv(cfg: MoeConfig, config: dict) -> list:
    if not cfg.norm_topk:
        raise QConvertError("llama.cpp's qwen3moe always renormalises the chosen experts' weights; this model has"
                            " norm_topk_prob false, so llama.cpp would compute a different function")
    if not all(cfg.sparse):
        raise QConvertError("llama.cpp's qwen3moe has experts in every layer; this model has dense layers"
                            " (mlp_only_layers / decoder_sparse_step)")
    return llama.extra_gguf_kv(cfg, config)


def qwen3_moe_from_gguf(kv: dict, shapes: dict, config: dict) -> None:
    llama.config_from_gguf(kv, shapes, config)
    if config.get("moe_intermediate_size") is None and "blk.0.ffn_gate_exps.weight" in shapes:
        config["moe_intermediate_size"] = int(shapes["blk.0.ffn_gate_exps.weight"][1])


MIXTRAL = Arch(
    name="mixtral", model_types=("mixtral",), gguf_arch="llama", tensors=MIXTRAL_TENSORS, parse_config=parse_mixtral,
    gguf_kv=MIXTRAL_KV, hf_defaults={"architectures": ["MixtralForCausalLM"], "hidden_act": "silu"},
    input_groups=partial(input_groups, MIXTRAL_NAMES), block=partial(block, MIXTRAL_NAMES),
    modules={"attn": llama.attention, "mlp": partial(mlp, MIXTRAL_NAMES)},
    gguf_permute_qk=True, gguf_match=lambda kv: _expert_count(kv) > 0, extra_gguf_kv=llama.extra_gguf_kv,
    config_from_gguf_extra=llama.config_from_gguf, rope_freqs=llama.rope_freq_factors,
    notes="llama.cpp's llama architecture with experts",
)

QWEN3_MOE = Arch(
    name="qwen3_moe", model_types=("qwen3_moe",), gguf_arch="qwen3moe", tensors=QWEN3_MOE_TENSORS,
    parse_config=parse_qwen3_moe, gguf_kv=QWEN3_MOE_KV,
    hf_defaults={"architectures": ["Qwen3MoeForCausalLM"], "hidden_act": "silu", "norm_topk_prob": True},
    input_groups=partial(input_groups, QWEN3_MOE_NAMES), block=partial(block, QWEN3_MOE_NAMES),
    modules={"attn": llama.attention, "mlp": partial(mlp, QWEN3_MOE_NAMES)},
    extra_gguf_kv=qwen3_moe_gguf_kv, config_from_gguf_extra=qwen3_moe_from_gguf,
)
