"""W8A8: int8 weights per output channel, int8 activations (static per tensor from calibration,
or dynamic per token), with optional SmoothQuant (Xiao et al., 2023; ANCHORS.md §C5).

Pure functions over arrays, plus the calibration driver that runs the float model through the
runtime (``record_inputs``):

* :func:`quantize_weight` - per-row symmetric int8 (``d = max|w_r| / 127``), the W8A8 codec;
* :func:`smooth_scales` - SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)``, the weight max
  over the rows of every linear that reads the same input, both clamped at 1e-5
  (mit-han-lab ``smooth_ln_fcs``); folded with :func:`qconvert.methods.awq.fold_into_norm`
  (norm weight ÷ s, the linears' columns × s; exact in real arithmetic);
* :func:`smooth_groups` - which norm feeds which linears (Llama: ``input_layernorm`` → q, k,
  v; ``post_attention_layernorm`` → gate, up; o_proj and down_proj have no norm before them
  and are not smoothed);
* :func:`calibrate` - pass 1 (only with smoothing): per-channel ``max|X|`` of each smoothed
  input; pass 2 (static mode): one observer per distinct linear input, fed the *smoothed*
  activations ``x / s`` (what the folded model computes), whose ``threshold(8)`` / 127 becomes
  the tensor's ``act_scale``. Linears that read the same input (q, k, v; gate, up) share one
  observer: they see the same stream, so separate observers would give the same threshold;
* :func:`run_w8a8` - the whole method over a source: the F32 reference container, the
  calibration windows, the folded norms and the encoded W8A8 matrices.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..blocks.w8a8 import QMAX, make_params, quantize_rows_int8
from ..errors import QConvertError
from .awq import fold_into_linear, fold_into_norm

ACT_MODES = ("static", "dynamic")
OBSERVERS = ("minmax", "percentile", "entropy", "mse")
TYPE_NAME = "W8A8"
_CLAMP = 1e-5


# ----------------------------------------------------------------------------- pure functions


def quantize_weight(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) float -> (q (out, in) int8, row scales (out,) float32): per output channel,
    symmetric, ``q = clamp(rint(w / d), -127, 127)`` with ``d = max|w_r| / 127``."""
    return quantize_rows_int8(np.asarray(W, dtype=np.float32))


def weight_channel_amax(Ws: Sequence[np.ndarray]) -> np.ndarray:
    """Per input channel, max |w| over the rows of all ``Ws`` (each (out_i, in)), float64."""
    return np.max([np.abs(np.asarray(W, dtype=np.float64)).max(axis=0) for W in Ws], axis=0)


def smooth_scales(act_amax: np.ndarray, Ws: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel scales (float32 (in,))::

        s_j = clamp(max|X_j|^α / clamp(max_rows |W_j|, 1e-5)^(1−α), 1e-5)

    ``act_amax``: max |x_j| over the calibration tokens; ``Ws``: the linears sharing the input."""
    if not 0.0 <= alpha <= 1.0:
        raise QConvertError(f"--smooth takes a migration strength α in [0, 1], got {alpha}")
    a = np.asarray(act_amax, dtype=np.float64)
    w = np.maximum(weight_channel_amax(Ws), _CLAMP)
    if a.shape != w.shape:
        raise QConvertError(f"activation maxima ({a.shape}) and weights ({w.shape}) disagree on the input width")
    s = np.maximum(a**alpha / w ** (1.0 - alpha), _CLAMP)
    return s.astype(np.float32)


def act_scale_from_threshold(amax: float) -> float | None:
    """The static activation scale ``f32(amax) / 127`` (float32); None when the observer saw
    only zeros (that tensor then quantizes its inputs per token at run time)."""
    s = np.float32(np.float32(amax) / np.float32(QMAX))
    return float(s) if np.isfinite(s) and s > 0 else None


def encode(W: np.ndarray, act_scale: float | None):
    """A W8A8 :class:`~qconvert.methods.calibrated.Encoded` of ``W`` (out, in)."""
    from .calibrated import Encoded

    q, d = quantize_weight(W)
    return Encoded(TYPE_NAME, q.view(np.uint8), make_params(d, act_scale))


def fold_smoothing(load: Callable[[str], np.ndarray], groups: Sequence[SmoothGroup],
                   scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 weights after SmoothQuant: each group's norm weight ÷ s and its linears'
    columns × s (``scales``: linear name -> s, as :func:`calibrate` returns). Exact in real
    arithmetic: the float model computes the same function (up to float32 rounding)."""
    out: dict[str, np.ndarray] = {}

    def current(name: str) -> np.ndarray:  # up_proj is folded twice: by its norm, then by down_proj
        return out[name] if name in out else load(name)

    for g in groups:
        s = scales[g.linears[0]]
        if g.prev_is_linear:
            prev, _pb, Ws = fold_into_linear(current(g.norm), None, [current(n) for n in g.linears], s)
        else:
            prev, _pb, Ws = fold_into_norm(current(g.norm), None, [current(n) for n in g.linears], s)
        out[g.norm] = np.asarray(prev, dtype=np.float32)
        for n, W in zip(g.linears, Ws):
            out[n] = np.asarray(W, dtype=np.float32)
    return out


# ----------------------------------------------------------------------------- model structure


@dataclass(frozen=True)
class SmoothGroup:
    norm: str  # the RMSNorm weight whose output the linears read (or the linear, see below)
    linears: tuple[str, ...]  # weight names, first = the one whose input is recorded
    # down_proj has no norm before it, but its input silu(gate)*up is linear in up_proj's
    # output rows, so the scale folds into up_proj's rows (AWQ's up -> down): without it
    # down_proj's outlier channels (max |x| ~ 3000 in SmolLM2) ruin static int8 ranges
    prev_is_linear: bool = False


_LLAMA_GROUPS = (
    ("input_layernorm.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), False),
    ("post_attention_layernorm.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), False),
    ("mlp.up_proj.weight", ("mlp.down_proj.weight",), True),
)


def smooth_groups(architecture: str, config: dict, names: set[str] | Sequence[str]) -> list[SmoothGroup]:
    """The (norm → linears) pairs SmoothQuant folds into, for Llama-family models."""
    if architecture != "llama":
        raise QConvertError(f"--smooth (SmoothQuant) supports llama-family models, not {architecture}")
    names = set(names)
    groups = []
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        for norm, linears, prev_is_linear in _LLAMA_GROUPS:
            g = SmoothGroup(p + norm, tuple(p + n for n in linears), prev_is_linear)
            missing = [n for n in (g.norm, *g.linears) if n not in names]
            if missing:
                raise QConvertError(f"SmoothQuant: the model lacks {missing[0]}")
            groups.append(g)
    return groups


_SHARED_INPUT = (
    (re.compile(r"^(.*\.self_attn\.)[qkv]_proj\.weight$"), "qkv"),
    (re.compile(r"^(.*\.mlp\.)(?:gate|up)_proj\.weight$"), "gate_up"),
)


def input_key(name: str) -> str:
    """Linears with the same key read the same input (q/k/v; gate/up); others: their name."""
    for pattern, suffix in _SHARED_INPUT:
        m = pattern.match(name)
        if m:
            return m.group(1) + suffix
    return name


# ----------------------------------------------------------------------------- calibration


def _run_windows(model, windows, recorder, progress, offset: int, total: int) -> None:
    from ..runtime.weights import record_inputs

    record_inputs(recorder)
    try:
        for i, w in enumerate(windows):
            model.forward(w, model.new_cache(len(w)), all_logits=False)
            if progress is not None:
                progress(offset + i + 1, total)
    finally:
        record_inputs(None)


@dataclass
class Calibration:
    linears: list[str]  # every recorded linear (the output projection excluded), in call order
    smooth: dict[str, np.ndarray]  # linear name -> s (its group's), for smoothed linears
    thresholds: dict[str, float]  # linear name -> observer threshold (static mode)


def calibrate(model, windows: Sequence[np.ndarray], skip: set[str], observer: str | None,
              groups: Sequence[SmoothGroup] = (), alpha: float | None = None,
              load: Callable[[str], np.ndarray] | None = None, progress=None) -> Calibration:
    """Run the calibration windows through ``model`` (a float container's runtime model).

    ``groups``/``alpha``/``load``: SmoothQuant (pass 1 collects max |x| per channel of each
    group's input, then ``s`` from the group's weights via ``load``). ``observer``: a name for
    static activation scales (pass 2), or None (dynamic: no thresholds needed)."""
    from ..observers import make_observer

    passes = (1 if groups else 0) + (1 if observer else 0)
    total = passes * len(windows)
    seen: list[str] = []  # the linears the model calls, in call order (``skip`` left out)
    seen_set: set[str] = set()

    def note(name: str) -> bool:
        if name in skip:
            return False
        if name not in seen_set:
            seen_set.add(name)
            seen.append(name)
        return True

    smooth: dict[str, np.ndarray] = {}
    if groups:
        leaders = {g.linears[0]: g for g in groups}
        amax: dict[str, np.ndarray] = {}

        def record_amax(name: str, x: np.ndarray) -> None:
            if not note(name) or name not in leaders:
                return
            m = np.abs(np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])).max(axis=0)
            amax[name] = m if name not in amax else np.maximum(amax[name], m)

        _run_windows(model, windows, record_amax, progress, 0, total)
        for lead, g in leaders.items():
            if lead not in amax:
                raise QConvertError(f"SmoothQuant: calibration never ran {lead}")
            s = smooth_scales(amax[lead], [load(n) for n in g.linears], alpha)
            for n in g.linears:
                smooth[n] = s
    thresholds: dict[str, float] = {}
    if observer:
        observers: dict[str, tuple] = {}  # input key -> (observer, the linear that feeds it)
        keys: dict[str, str] = {}

        def record_obs(name: str, x: np.ndarray) -> None:
            if not note(name):
                return
            key = keys.get(name)
            if key is None:
                key = keys[name] = input_key(name)
            if key in observers and observers[key][1] != name:
                return  # another linear reading the same input feeds this observer
            if key not in observers:
                observers[key] = (make_observer(observer), name)
            x = np.asarray(x, dtype=np.float32)
            if name in smooth:
                x = x / smooth[name]
            observers[key][0].update(x)

        _run_windows(model, windows, record_obs, progress, total - len(windows), total)
        for name in seen:
            thresholds[name] = float(observers[keys[name]][0].threshold(bits=8, symmetric=True))
    if not seen and len(windows):  # neither pass ran: one window only to list the linears
        _run_windows(model, windows[:1], lambda name, x: note(name), None, 0, 1)
    return Calibration(seen, smooth, thresholds)


# ----------------------------------------------------------------------------- the method


def check_options(observer: str, smooth: float | None, act_mode: str) -> str:
    from ..observers import make_observer

    if act_mode not in ACT_MODES:
        raise QConvertError(f"--act-mode must be static or dynamic, not {act_mode!r}")
    if smooth is not None and not 0.0 <= smooth <= 1.0:
        raise QConvertError(f"--smooth takes a migration strength α in [0, 1], got {smooth}")
    return make_observer(observer).name  # validates (and resolves aliases such as kl)


def run_w8a8(source_spec, source, targets: set[str], calib, n_samples: int, seqlen: int, seed: int,
             observer: str = "minmax", smooth: float | None = None, act_mode: str = "static",
             revision: str | None = None, progress=None):
    """W8A8 over an open ``source`` (``source_spec``: the path/id it was opened from, to build
    the float reference the calibration runs). ``targets``: the matrices the plan lets the
    method quantize (not kept, not forced, not the output projection).

    Returns (encoded W8A8 matrices, folded norm weights, recipe info)."""
    from ..calibration import calibration_set
    from ..container import open_container
    from ..convert import quantize
    from ..plan import output_tensor_name
    from ..runtime.models import load_model
    from ..runtime.tokenizer import Tokenizer

    observer = check_options(observer, smooth, act_mode)
    by_name = {t.name: t for t in source.tensors}

    def load(name: str) -> np.ndarray:
        values = by_name[name].load().astype(np.float32)
        if not np.isfinite(values).all():
            raise QConvertError(f"tensor {name} has NaN or infinite values; refusing to quantize it")
        return values

    groups = smooth_groups(source.architecture, source.config, by_name) if smooth is not None else []
    # a group is smoothed only when the plan lets the method rewrite all its linears
    groups = [g for g in groups if all(n in targets for n in g.linears) and (not g.prev_is_linear or g.norm in targets)]
    if act_mode == "dynamic":
        # up -> down smoothing exists for static per-tensor ranges (down_proj's outlier channels);
        # per-token scales do without it, and it only moves difficulty into the weights
        # (SmolLM2, 4 windows: dynamic+SQ PPL 22.86 without it, 22.91 with it)
        groups = [g for g in groups if not g.prev_is_linear]
    static = act_mode == "static"
    needs_data = static or bool(groups)
    with tempfile.TemporaryDirectory(prefix="qconvert-w8a8-") as tmp:
        ref = Path(tmp) / "f32.q"
        quantize(source_spec, ref, method="f32", revision=revision)
        with open_container(ref) as c:
            model = load_model(c)
            if not hasattr(model, "forward"):
                raise QConvertError("w8a8 calibrates language models (llama or gpt2)")
            tok = Tokenizer.from_container(c)
            if needs_data:
                calib_set = calibration_set(tok, calib, n_samples, seqlen, seed)
                windows, calib_info = list(calib_set.tokens), calib_set.info
            else:  # only to list the model's linears: two tokens
                windows, calib_info = [np.array([tok.bos_id if tok.bos_id is not None else 0] * 2)], None
            skip = {output_tensor_name(list(c.tensors), c.config)} - {None}
            cal = calibrate(model, windows, skip, observer if static else None, groups, smooth, load, progress)
            del model
    folded = fold_smoothing(load, groups, cal.smooth)
    encoded, floats = {}, {}
    for g in groups:
        if not g.prev_is_linear:
            floats[g.norm] = folded.pop(g.norm)
    for n in cal.linears:
        if n in targets:
            W = folded.pop(n) if n in folded else load(n)
            encoded[n] = encode(W, act_scale_from_threshold(cal.thresholds[n]) if static else None)
    info = {
        "calibration": calib_info,
        "observer": observer if static else None,
        "smooth": smooth,
        "act_mode": act_mode,
    }
    return encoded, floats, info
