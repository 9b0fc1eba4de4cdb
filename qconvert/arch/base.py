"""What every architecture file declares, and the machinery that reads those declarations.

A family file (``arch/llama.py``, ``arch/gemma.py`` ...) holds everything qconvert knows about
that family, as data plus a block forward:

* ``TENSORS`` -- one table of :class:`T` rows: Hugging Face name, llama.cpp GGUF name and the
  tensor's *role* (llama.cpp's category: ``attn_q``, ``ffn_down``, ``attn_norm`` ...). Names are
  templates: ``{i}`` is the layer, ``{e}`` an expert. The same table is read in both directions
  (:meth:`Arch.gguf_name`, :meth:`Arch.hf_name`); a GGUF name without ``{e}`` for an HF name with
  it is llama.cpp's merged 3-D expert tensor (experts stacked along the outermost axis).
* ``Config`` -- a frozen dataclass parsed *and validated* from the HF config.json dict;
* ``GGUF_KV`` -- :class:`K` rows, GGUF hyper-parameter key <-> HF config key, both directions;
* ``input_groups(cfg, i)`` -- which linears read the same input, and what produced it (a norm
  or a linear), for scale folding (AWQ, SmoothQuant) and rotations;
* ``block(cfg, layer, x, ctx)`` -- the decoder block's forward in numpy, written against the
  :class:`Layer` interface, so the runtime (packed weights) and calibration (float weights with
  hooks) run the *same* code.

Nothing outside ``arch/`` spells a tensor name of a model family.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import QConvertError

# Sizes no real checkpoint reaches; a config past them is corrupt or hostile.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22
MAX_INTERMEDIATE = 1 << 20
MAX_POSITIONS = 1 << 24
MAX_EXPERTS = 1024

# Roles whose tensors stay in float (llama.cpp keeps norms and biases unquantized too).
FLOAT_ROLES = ("norm", "bias", "pos_embd", "token_types", "router")


@dataclass(frozen=True)
class T:
    """One tensor of a family: Hugging Face name, GGUF name, role (templates with {i}, {e})."""

    hf: str
    gguf: str | None  # None: llama.cpp has no such tensor (export refuses it)
    role: str

    @property
    def float_only(self) -> bool:
        return any(self.role == r or self.role.endswith("_" + r) for r in FLOAT_ROLES)


@dataclass(frozen=True)
class K:
    """One GGUF hyper-parameter ``{arch}.<gguf>``: read into config.json key ``hf``, written
    from the parsed config's attribute ``attr``."""

    gguf: str
    hf: str
    attr: str
    kind: str  # "u32" | "f32" | "bool" | "str"
    default: Any = None  # used when reading a GGUF that lacks the key (None: leave it out)


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same activation, and what produced it.

    ``prev`` is a norm weight (``prev_kind="norm"``) or a linear (``"linear"``) whose output
    channels feed the group's input channels one to one -- so a per-channel scale ``s`` can be
    folded as ``prev / s`` and ``linear[:, j] * s``. ``prev_tail``: only the producer's *last*
    rows feed the group, as many as its input channels (a fused qkv's v rows before o_proj, a
    fused gate_up's up rows before down_proj); they alone take ``1 / s``. ``module`` names the
    sub-layer (``"attn"``, ``"mlp"``) whose output AWQ's search compares; None means compare the
    linears' own outputs. ``fold`` lists further tensors that read the same input but are not
    quantized (a MoE router) and so must take the scale too; when the linears are MoE experts
    (each reads only the tokens routed to it) ``fold[0]`` is what reads every token, and the
    group's activation statistics come from its input."""

    prev: str | None  # HF tensor name relative to the layer ("input_layernorm.weight"), or None
    linears: tuple[str, ...]
    prev_kind: str = "norm"
    module: str | None = None
    fold: tuple[str, ...] = ()
    prev_tail: bool = False
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (offset + w)


class Layer(Protocol):
    """What a block forward sees of one layer's weights (relative names)."""

    def vector(self, name: str) -> np.ndarray: ...

    def has(self, name: str) -> bool: ...

    def linears(self, names: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        """Apply each of ``names`` (linears reading the same ``x``) to ``x`` (..., in)."""
        ...


# --------------------------------------------------------------------------------------------
# config validation


def cfg_int(cfg: dict, key: str, default: Any = None, lo: int = 1, hi: int = 1 << 31, what: str = "") -> int:
    value = cfg.get(key)
    value = default if value is None else value
    if value is None:
        raise QConvertError(f"config.json lacks {key!r}, which a{what or ' model'} needs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise QConvertError(f"config.json {key!r} is {value!r}, not an integer")
    value = int(value)
    if not lo <= value <= hi:
        raise QConvertError(f"config.json {key!r} is {value}; it must lie in {lo}..{hi}")
    return value


def cfg_float(cfg: dict, key: str, default: Any = None, positive: bool = True) -> float:
    value = cfg.get(key)
    value = default if value is None else value
    if value is None:
        raise QConvertError(f"config.json lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QConvertError(f"config.json {key!r} is {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or value < 0:
        raise QConvertError(f"config.json {key!r} is {value}; it must be a finite {'positive' if positive else 'non-negative'} number")
    return value


def check_heads(hidden: int, n_heads: int, n_kv: int, head_dim: int, explicit_head_dim: bool) -> None:
    if n_heads % n_kv:
        raise QConvertError(f"num_key_value_heads {n_kv} does not divide num_attention_heads {n_heads}")
    if not explicit_head_dim and hidden % n_heads:
        raise QConvertError(f"num_attention_heads {n_heads} does not divide hidden_size {hidden}")
    if head_dim % 2:
        raise QConvertError(f"head_dim {head_dim} is odd; rotary embeddings need an even head size")


def rope_settings(cfg: dict, default_theta: float = 10000.0, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers' ``rope_parameters`` (v5, possibly per layer
    type) or the older ``rope_theta`` / ``rope_scaling`` keys; validated."""
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise QConvertError(f"config.json rope_parameters is {rope!r}, not an object")
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    elif any(isinstance(v, dict) for v in rope.values()):
        rope = next(v for v in rope.values() if isinstance(v, dict))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") not in ("default", None):
        scaling = rope
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise QConvertError(f"config.json rope_scaling is {scaling!r}, not an object")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise QConvertError(f"RoPE scaling {kind!r} is not supported (linear, llama3)")
        else:
            cfg_float(scaling, "factor")
            if kind == "llama3":
                cfg_float(scaling, "original_max_position_embeddings")
    theta_cfg = {"rope_theta": cfg.get("rope_theta") if cfg.get("rope_theta") is not None else rope.get("rope_theta")}
    if layer_type is not None and rope.get("rope_theta") is not None:
        theta_cfg["rope_theta"] = rope["rope_theta"]
    return cfg_float(theta_cfg, "rope_theta", default_theta), scaling


# --------------------------------------------------------------------------------------------
# the architecture object


def _template_regex(template: str) -> re.Pattern:
    out = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(out)


@dataclass
class Arch:
    """One architecture: built by a family file from its declarations (see the module doc)."""

    name: str  # container model.architecture
    model_types: tuple[str, ...]  # HF config.json model_type values
    gguf_arch: str  # GGUF general.architecture written (and read)
    tensors: tuple[T, ...]
    parse_config: Callable[[dict], Any]
    gguf_kv: tuple[K, ...] = ()
    hf_defaults: dict = field(default_factory=dict)  # config.json keys a GGUF source fills in
    input_groups: Callable[[Any, int], list[InputGroup]] | None = None
    block: Callable | None = None  # (cfg, layer, x (B, T, H), ctx) -> x
    modules: dict[str, Callable] = field(default_factory=dict)  # sub-layers named by InputGroup.module
    kind: str = "decoder"  # "decoder" | "encoder" | "custom"
    gguf_permute_qk: bool = False  # llama.cpp's llama arch stores q/k rows pair-interleaved
    gguf_archs_read: tuple[str, ...] = ()  # other GGUF architectures this family reads
    # (GGUF metadata) -> True when this family, rather than another one of the same GGUF
    # architecture, reads the file (Mixtral is llama.cpp's "llama" with experts); see arch.by_gguf
    gguf_match: Callable[[dict], bool] | None = None
    layer_prefix: str = "model.layers.{i}."
    hf_prefixes: tuple[str, ...] = ("",)  # prefixes an HF name may carry before the table's names
    hf_transposed: re.Pattern | None = None  # HF weights stored (in, out) that the container stores (out, in)
    hf_skip: re.Pattern | None = None  # HF buffers that are not weights
    extra_gguf_kv: Callable[[Any, dict], list] | None = None  # (cfg, config dict) -> [(key, kind, value)]
    config_from_gguf_extra: Callable[[dict, dict, dict], None] | None = None  # (kv, shapes, config)
    runtime: Callable | None = None  # (weights, config) -> model, for non-decoder kinds
    rope_freqs: Callable | None = None  # cfg -> llama.cpp's rope_freqs tensor (Llama 3) or None
    gguf_value_offset: dict[str, float] = field(default_factory=dict)  # role -> added on export (Gemma norms +1)
    notes: str = ""

    def __post_init__(self) -> None:
        self._hf_re = [(_template_regex(t.hf), t) for t in self.tensors]
        self._gguf_re = [(_template_regex(t.gguf), t) for t in self.tensors if t.gguf]

    # ---- names
    def entry(self, hf_name: str) -> tuple[T, dict[str, int]] | None:
        """The table row of an HF tensor name and its {i}/{e} values, or None."""
        for prefix in self.hf_prefixes:
            if not hf_name.startswith(prefix):
                continue
            rest = hf_name[len(prefix):]
            for rx, t in self._hf_re:
                m = rx.fullmatch(rest)
                if m:
                    return t, {k: int(v) for k, v in m.groupdict().items()}
        return None

    def role(self, hf_name: str) -> str:
        e = self.entry(hf_name)
        return e[0].role if e else "other"

    def layer_of(self, hf_name: str) -> int | None:
        e = self.entry(hf_name)
        return e[1].get("i") if e else None

    def gguf_name(self, hf_name: str) -> tuple[str, int | None]:
        """(GGUF name, expert index in a merged tensor or None) for an HF tensor name."""
        e = self.entry(hf_name)
        if e is None or e[0].gguf is None:
            raise QConvertError(f"tensor {hf_name!r} has no llama.cpp name for {self.gguf_arch}; cannot export it to GGUF")
        t, idx = e
        name = t.gguf.format(**idx)
        return name, (idx.get("e") if "{e}" in t.hf and "{e}" not in t.gguf else None)

    def hf_names(self, gguf_name: str, n_experts: int = 0) -> list[str] | None:
        """HF names for a GGUF tensor name (several for a merged expert tensor); None if the
        family has no such tensor."""
        for rx, t in self._gguf_re:
            m = rx.fullmatch(gguf_name)
            if m:
                idx = {k: int(v) for k, v in m.groupdict().items()}
                if "{e}" in t.hf and "{e}" not in (t.gguf or ""):
                    return [t.hf.format(e=e, **idx) for e in range(n_experts)]
                return [t.hf.format(**idx)]
        return None

    def is_float_only(self, hf_name: str) -> bool:
        e = self.entry(hf_name)
        return e is not None and e[0].float_only

    def output_name(self, names: list[str] | set[str], config: dict) -> str | None:
        """The tensor projecting hidden states to logits: ``output``, else the tied embedding."""
        by_role: dict[str, str] = {}
        for n in names:
            role = self.role(n)
            by_role.setdefault(role, n)
        if "output" in by_role:
            return by_role["output"]
        if config.get("tie_word_embeddings", True):
            return by_role.get("token_embd")
        return None

    def layer_name(self, i: int, rel: str) -> str:
        return self.layer_prefix.format(i=i) + rel

    # ---- GGUF hyper-parameters
    def kv_to_gguf(self, config: dict) -> list[tuple[str, str, Any]]:
        """(key, kind, value) of every hyper-parameter llama.cpp reads for this family."""
        cfg = self.parse_config(config)
        out = []
        for k in self.gguf_kv:
            value = getattr(cfg, k.attr)
            if value is not None:
                out.append((f"{self.gguf_arch}.{k.gguf}", k.kind, _cast(value, k.kind)))
        if self.extra_gguf_kv is not None:
            out += [(f"{self.gguf_arch}.{key}", kind, value) for key, kind, value in self.extra_gguf_kv(cfg, config)]
        return out

    def config_from_gguf(self, kv: dict, shapes: dict[str, tuple[int, ...]], gguf_arch: str) -> dict:
        config: dict[str, Any] = {"model_type": self.model_types[0], **self.hf_defaults}
        for k in self.gguf_kv:
            key = f"{gguf_arch}.{k.gguf}"
            value = kv.get(key, k.default)
            if value is None:
                continue
            _set_dotted(config, k.hf, _gguf_value(value, key, k.kind))
        if self.config_from_gguf_extra is not None:
            self.config_from_gguf_extra(kv, shapes, config)
        return config


def _gguf_value(value: Any, key: str, kind: str) -> Any:
    if isinstance(value, list):  # llama.cpp writes some per-layer values as arrays
        if not value or len(set(map(repr, value))) != 1:
            raise QConvertError(f"GGUF metadata {key!r} differs between layers; qconvert supports uniform layers only")
        value = value[0]
    if kind == "u32":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise QConvertError(f"GGUF metadata {key!r} is {value!r}, not a non-negative integer")
    elif kind == "f32":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise QConvertError(f"GGUF metadata {key!r} is {value!r}, not a finite number")
        value = float(value)
    elif kind == "bool" and not isinstance(value, bool):
        raise QConvertError(f"GGUF metadata {key!r} is {value!r}, not a boolean")
    return value


def _cast(value: Any, kind: str) -> Any:
    return {"u32": int, "f32": float, "bool": bool, "str": str}[kind](value)


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = cfg
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


# --------------------------------------------------------------------------------------------
# forward-pass context shared by the runtime and calibration


class Context:
    """Positions and cached tables for one forward call of ``T`` tokens after ``pos0``.

    ``cache`` is a :class:`KVCache` (runtime: one sequence, B = 1) or None (calibration: every
    sequence of the batch starts at position 0 and attends to itself only)."""

    def __init__(self, T: int, pos0: int = 0, cache: "KVCache | None" = None) -> None:
        self.T, self.pos0, self.cache = T, pos0, cache
        self.S = pos0 + T
        self._tables: dict = {}

    def rope(self, head_dim: int, theta: float, scaling: dict | None) -> tuple[np.ndarray, np.ndarray]:
        from ..runtime.ops import rope_tables

        key = ("rope", head_dim, theta, repr(scaling))
        if key not in self._tables:
            self._tables[key] = rope_tables(np.arange(self.pos0, self.S), head_dim, theta, scaling)
        return self._tables[key]

    def mask(self, window: int | None = None) -> np.ndarray:
        """(T, S) additive causal mask; with ``window``, key j is seen by query t only when
        t - j < window (HF's sliding window: the last ``window`` positions, itself included)."""
        key = ("mask", window)
        if key not in self._tables:
            q = self.pos0 + np.arange(self.T)[:, None]
            k = np.arange(self.S)[None, :]
            hidden = k > q
            if window:
                hidden |= (q - k) >= window
            self._tables[key] = np.where(hidden, -np.inf, 0.0).astype(np.float32)
        return self._tables[key]


class KVCache:
    """Keys and values per layer, (n_kv_heads, capacity, head_dim) each, for one sequence."""

    def __init__(self, n_layers: int, n_kv: int | list[int], head_dim: int | list[int], capacity: int) -> None:
        n_kvs = n_kv if isinstance(n_kv, list) else [n_kv] * n_layers
        hds = head_dim if isinstance(head_dim, list) else [head_dim] * n_layers
        self.k = [np.zeros((n_kvs[i], capacity, hds[i]), np.float32) for i in range(n_layers)]
        self.v = [np.zeros((n_kvs[i], capacity, hds[i]), np.float32) for i in range(n_layers)]
        self.length = 0
        self.capacity = capacity
