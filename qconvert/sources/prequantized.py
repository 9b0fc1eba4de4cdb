"""Pre-quantized Hugging Face checkpoints: GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM).

Their integers, zero points and fp16 scales are imported as they are -- no re-quantization --
into the group-wise integer blocks ``I{bits}G{group}`` (:mod:`qconvert.blocks.groupwise`,
``w = (q - zero) * scale``). Layouts (ANCHORS A4):

GPTQ (``quant_method: "gptq"``, ``format``/``checkpoint_format`` ``"gptq"`` or ``"gptq_v2"``):
  ``qweight`` int32 ``[in * bits / 32, out]``: each column is a little-endian bit stream of
  the input rows, row k at bit ``k * bits`` (LSB first; for 3 bits a value may straddle two
  words -- AutoGPTQ's 32-values-in-3-words layout is exactly this stream).
  ``qzeros`` int32 ``[groups, out * bits / 32]``: the same stream along the output columns.
  ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]`` (group of each input row).
  ``w[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``.
  The v1 format (``"gptq"``) stores ``zero - 1``. GPTQModel, which transformers uses to load
  GPTQ checkpoints, undoes it by adding ``0x11111111`` (4 bits; 0x55555555 for 2, 0x01010101
  for 8) to each packed int32 word, the exact inverse of its own v2 -> v1 save (a zero point
  of 0 borrows from the next field); 3-bit words are shifted field by field, modulo 8. qconvert
  does the same, so every zero point lands in 0 .. 2**bits - 1.
  Act-order (``desc_act``) checkpoints have a non-monotonic ``g_idx``: the stored matrix takes
  the columns in the stable order of their group (``input_perm``, applied by the runtime) so
  that every block of the container lies in one group.

AWQ (``quant_method: "awq"``, ``version``/``format`` ``"gemm"``, 4 bits):
  ``qweight`` int32 ``[in, out / 8]``: nibble i (bits 4i..4i+3) of word column c holds output
  column ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``; ``qzeros`` int32 ``[groups, out / 8]`` the same
  interleave, zero points as they are; ``scales`` fp16 ``[groups, out]``; no ``g_idx``.
  ``zero_point: false`` (GPTQModel's symmetric AWQ) still stores qzeros (all 8): same decoding.

Block groups: the container block size is the largest of 128, 64 and 32 that divides the
row length and the number of columns of every checkpoint group, so per-channel GPTQ
(``group_size: -1``) and groups of 256 are stored exactly too (a group's scale and zero repeat
in each of its blocks). Tensors without ``qweight`` (embeddings, norms, an unquantized
``lm_head``, biases) come through as ordinary float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import safejson
from ..errors import QConvertError
from .base import SourceTensor

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot i holds output column 8c + AWQ_ORDER[i]
GPTQ_BITS = (2, 3, 4, 8)
_BLOCK_GROUPS = (128, 64, 32)
_ITEMSIZE = {"I32": 4, "F16": 2, "F32": 4, "BF16": 2}
_KERNEL_FORMATS = ("marlin", "bitblas", "exllama", "exllamav2", "exllama_v2", "qqq", "gptq_p", "ipex", "machete")
_LEGACY_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


@dataclass(frozen=True)
class QuantInfo:
    """What the checkpoint's quantization config says (normalised)."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per row (per-channel)
    fmt: str  # "gptq" (v1 zeros, stored zero - 1) | "gptq_v2" | "gemm"
    desc_act: bool | None
    sym: bool | None
    config: dict  # the quantization config as found
    config_file: str  # where it was found: "config.json" or quantize_config.json ...

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.method, "bits": self.bits, "group": self.group_size, "format": self.fmt}
        if self.method == "gptq":
            out["desc_act"] = self.desc_act
            out["sym"] = self.sym
            out["static_groups"] = _static_groups(self.config)
        else:
            out["sym"] = self.sym
            out["zero_point"] = not self.sym
        return out


def _as_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise QConvertError(f"{where}: {what} must be an integer, got {value!r}")


def _opt_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def detect(folder: Path, config: dict) -> QuantInfo | None:
    """The checkpoint's GPTQ/AWQ description, None for a float checkpoint; QConvertError for a
    quantized checkpoint qconvert cannot import (another method, a kernel-specific layout ...)."""
    qc = config.get("quantization_config")
    where = "config.json quantization_config"
    if not qc:
        for name in _LEGACY_CONFIG_FILES:  # AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json
            p = folder / name
            if p.is_file():
                qc = safejson.loads(safejson.read_file(p, f"{name} in {folder.name}"), f"{name} in {folder.name}")
                where = name
                break
        if not qc:
            return None
    if not isinstance(qc, dict):
        raise QConvertError(f"{folder.name}: {where} is not a JSON object")
    method = str(qc.get("quant_method") or qc.get("method") or "").lower()
    if not method:  # old AutoGPTQ / AutoAWQ files name no method
        method = "awq" if ("w_bit" in qc or "q_group_size" in qc or "zero_point" in qc) else "gptq"
    if method not in ("gptq", "awq"):
        raise QConvertError(
            f"{folder.name} is already quantized ({method}); qconvert imports GPTQ and AWQ (GEMM) checkpoints only"
        )
    for key in ("rotation", "activation", "adapter"):
        if qc.get(key):
            raise QConvertError(
                f"{folder.name}: {method.upper()} checkpoint with {key}={qc[key]!r} cannot be imported "
                "(the weights need more than integer dequantization at run time)"
            )
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise QConvertError(f"{folder.name}: {where} 'dynamic' must be an object")
    overrides = [k for k, v in dynamic.items() if not str(k).startswith("-:") and v]
    if overrides:
        raise QConvertError(
            f"{folder.name}: per-module quantization overrides ('dynamic': {overrides[0]!r} ...) are not supported; "
            "qconvert imports checkpoints with one bits/group_size for every quantized module"
        )
    if method == "gptq":
        return _detect_gptq(folder, qc, where)
    return _detect_awq(folder, qc, where)


def _detect_gptq(folder: Path, qc: dict, where: str) -> QuantInfo:
    if qc.get("is_marlin_format"):
        raise QConvertError(
            f"{folder.name}: a Marlin-format GPTQ checkpoint (kernel-specific repacked layout) cannot be imported; "
            "use the checkpoint saved in the plain gptq format"
        )
    fmt = str(qc.get("format") or qc.get("checkpoint_format") or "gptq").lower()
    if fmt in ("gptq_v1", "v1"):
        fmt = "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        kind = "a kernel-specific repacked layout" if fmt in _KERNEL_FORMATS else "a layout qconvert does not read"
        raise QConvertError(
            f"{folder.name}: GPTQ checkpoint format {fmt!r} ({kind}) cannot be imported; "
            "qconvert reads the 'gptq' (v1) and 'gptq_v2' formats"
        )
    bits = _as_int(qc.get("bits", 4), "bits", where)
    if bits not in GPTQ_BITS:
        raise QConvertError(f"{folder.name}: {bits}-bit GPTQ cannot be imported; qconvert reads 2, 3, 4 and 8 bits")
    pack = str(qc.get("pack_dtype") or "int32").lower().replace("torch.", "")
    if pack != "int32":
        raise QConvertError(f"{folder.name}: GPTQ packed in {pack} words cannot be imported; qconvert reads int32 packing")
    group = _as_int(qc.get("group_size", 128), "group_size", where)
    if group != -1 and group <= 0:
        raise QConvertError(f"{folder.name}: GPTQ group_size must be -1 or positive, got {group}")
    return QuantInfo("gptq", bits, group, fmt, _opt_bool(qc.get("desc_act")), _opt_bool(qc.get("sym")), qc, where)


def _static_groups(qc: dict) -> bool:
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    return bool(qc.get("static_groups", meta.get("static_groups", False)))


def _detect_awq(folder: Path, qc: dict, where: str) -> QuantInfo:
    version = str(qc.get("version") or qc.get("format") or qc.get("checkpoint_format") or "gemm").lower()
    if version != "gemm":
        raise QConvertError(
            f"{folder.name}: AWQ version {version!r} cannot be imported; qconvert reads the GEMM layout "
            "(AutoAWQ version 'gemm') only"
        )
    if str(qc.get("backend") or "autoawq").lower() == "llm-awq":
        raise QConvertError(f"{folder.name}: llm-awq packed AWQ checkpoints cannot be imported; qconvert reads AutoAWQ GEMM")
    # zero_point: false (symmetric, GPTQModel) still stores qzeros (2**(bits-1)); dequantization is the same
    bits = _as_int(qc.get("bits", qc.get("w_bit", 4)), "bits", where)
    if bits != 4:
        raise QConvertError(f"{folder.name}: {bits}-bit AWQ cannot be imported; the GEMM layout qconvert reads is 4-bit")
    group = _as_int(qc.get("group_size", qc.get("q_group_size", 128)), "group_size", where)
    return QuantInfo("awq", 4, group, "gemm", None, qc.get("zero_point", True) is False, qc, where)


# --- tensors --------------------------------------------------------------------------------


@dataclass
class PrequantizedTensor(SourceTensor):
    """A GPTQ/AWQ linear as block type ``I{bits}G{group}``: ``load_raw()`` gives the blocks
    (columns in stored order), ``params`` the tensor entry's params (``input_perm`` for
    act-order), ``load()`` the dequantized weights in the model's column order."""

    params: dict = field(default_factory=dict)

    def load(self) -> np.ndarray:
        from ..blocks import by_name

        stored = by_name(self.dtype).dequantize(self.load_raw(), self.shape)
        perm = self.params.get("input_perm")
        if perm is None:
            return stored
        out = np.empty_like(stored)
        out[:, np.asarray(perm, dtype=np.int64)] = stored
        return out


def is_prequantized(tensor: SourceTensor) -> bool:
    return isinstance(tensor, PrequantizedTensor)


class Collector:
    """Gathers the ``qweight/qzeros/scales/g_idx`` entries of a checkpoint's safetensors files
    (``claim`` / ``add`` while the source lists them) and turns each module into one
    :class:`PrequantizedTensor` (``tensors``)."""

    def __init__(self, info: QuantInfo) -> None:
        self.info = info
        self.parts: dict[str, dict[str, tuple]] = {}

    @staticmethod
    def claims(name: str) -> bool:
        return name.rpartition(".")[2] in QUANT_SUFFIXES

    def add(self, name: str, file, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        prefix, _, suffix = name.rpartition(".")
        entry = self.parts.setdefault(prefix, {})
        if suffix in entry:
            raise QConvertError(f"tensor {name!r} appears in more than one shard")
        if dtype not in _ITEMSIZE:
            raise QConvertError(f"tensor {name!r} has dtype {dtype}, not what a {self.info.method.upper()} checkpoint stores")
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if nbytes != n * _ITEMSIZE[dtype]:
            raise QConvertError(f"corrupt safetensors file {file.path.name}: tensor {name!r} has the wrong byte length")
        entry[suffix] = (file, name, dtype, tuple(shape))

    def tensors(self) -> list[PrequantizedTensor]:
        out = []
        for prefix in sorted(self.parts):
            parts = self.parts[prefix]
            if "qweight" not in parts:
                found = ", ".join(f"{prefix}.{s}" for s in sorted(parts))
                raise QConvertError(f"{found} without {prefix}.qweight: not a complete {self.info.method.upper()} module")
            out.append(_gptq_tensor(prefix, parts, self.info) if self.info.method == "gptq"
                       else _awq_tensor(prefix, parts, self.info))
        if not out and self.info.config_file == "config.json":
            raise QConvertError(
                f"config.json says {self.info.method.upper()} but the checkpoint has no .qweight tensors"
            )
        return out  # empty: a float checkpoint beside a stale quantize_config.json (e.g. a dequantized copy)


def _read(part: tuple) -> np.ndarray:
    file, name, dtype, shape = part
    raw = file.read(name)
    if dtype == "I32":
        return raw.view("<i4").reshape(shape)
    if dtype == "F16":
        return raw.view("<f2").reshape(shape)
    if dtype == "F32":
        return raw.view("<f4").reshape(shape)
    u = raw.view("<u2").astype(np.uint32) << np.uint32(16)  # BF16
    return u.view(np.float32).reshape(shape)


def _need(parts: dict, prefix: str, suffix: str, dtypes: tuple[str, ...], ndim: int, method: str) -> tuple:
    if suffix not in parts:
        raise QConvertError(f"{method.upper()} module {prefix} lacks {prefix}.{suffix}")
    part = parts[suffix]
    if part[2] not in dtypes:
        raise QConvertError(f"{prefix}.{suffix} has dtype {part[2]}; a {method.upper()} checkpoint stores {'/'.join(dtypes)}")
    if len(part[3]) != ndim:
        raise QConvertError(f"{prefix}.{suffix} has shape {list(part[3])}, expected {ndim} dimensions")
    return part


def _scales(part: tuple, prefix: str) -> np.ndarray:
    s = _read(part)
    s32 = s.astype(np.float32)
    if not np.all(np.isfinite(s32)):
        raise QConvertError(f"{prefix}.scales has NaN or infinite values; refusing to import it")
    if s.dtype != np.float16 and not np.array_equal(s32.astype(np.float16).astype(np.float32), s32):
        raise QConvertError(
            f"{prefix}.scales holds values float16 cannot represent exactly; group-wise blocks store f16 scales"
        )
    return s32.astype(np.float16)


def unpack_stream(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """int32 words (R, C), each column a little-endian bit stream of ``bits``-bit values
    (value k at bit ``k * bits``) -> the first n values of each column, (n, C) uint8."""
    w = np.ascontiguousarray(words).view(np.uint32)
    rows, cols = w.shape
    if rows * 32 < n * bits:
        raise QConvertError(f"{rows} packed words per column cannot hold {n} values of {bits} bits")
    if rows % bits:  # whole units of `bits` words = 32 values; the padding is never returned
        w = np.concatenate([w, np.zeros((bits - rows % bits, cols), np.uint32)])
        rows = w.shape[0]
    units = w.reshape(rows // bits, bits, cols)
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((rows // bits, 32, cols), np.uint8)
    for k in range(32):
        off = k * bits
        word, shift = divmod(off, 32)
        v = units[:, word, :] >> np.uint32(shift)
        if shift + bits > 32:
            v = v | (units[:, word + 1, :] << np.uint32(32 - shift))
        out[:, k, :] = v & mask
    return out.reshape(-1, cols)[:n]


def _block_group(counts: np.ndarray, in_f: int, prefix: str, what: str) -> int:
    used = counts[counts > 0]
    for g in _BLOCK_GROUPS:
        if in_f % g == 0 and np.all(used % g == 0):
            return g
    sizes = sorted(set(int(c) for c in used))
    raise QConvertError(
        f"{prefix}: {what} with groups of {', '.join(map(str, sizes[:4]))} input columns (rows of {in_f}) cannot be "
        "stored exactly in group-wise blocks of 32, 64 or 128"
    )


def _encode(prefix: str, q_io: np.ndarray, zeros: np.ndarray, scales: np.ndarray, gidx: np.ndarray,
            bits: int, g: int, perm: np.ndarray | None):
    """q (in, out), zeros/scales (groups, out), gidx (in,) -> Encoded with columns in stored order."""
    from ..blocks.groupwise import encode_linear

    q = q_io.T  # (out, in)
    order = perm if perm is not None else np.arange(q.shape[1])
    if perm is not None:
        q = q[:, perm]
    block_groups = gidx[order][::g]  # checkpoint group of each stored block
    try:
        return encode_linear(np.ascontiguousarray(q), scales[block_groups].T, zeros[block_groups].T, bits, perm)
    except QConvertError as e:
        raise QConvertError(f"{prefix}: {e}") from None


def _gptq_tensor(prefix: str, parts: dict, info: QuantInfo) -> PrequantizedTensor:
    bits = info.bits
    qw = _need(parts, prefix, "qweight", ("I32",), 2, "gptq")
    qz = _need(parts, prefix, "qzeros", ("I32",), 2, "gptq")
    sc = _need(parts, prefix, "scales", ("F16", "F32", "BF16"), 2, "gptq")
    rows, out_f = qw[3]
    if "g_idx" in parts:
        gi = _need(parts, prefix, "g_idx", ("I32",), 1, "gptq")
        in_f = gi[3][0]
    else:
        gi, in_f = None, rows * 32 // bits
    if rows * 32 != in_f * bits:
        raise QConvertError(
            f"{prefix}.qweight has {rows} rows, but {in_f} input columns of {bits} bits take {in_f * bits / 32:g}"
        )
    if in_f % 32:
        raise QConvertError(f"{prefix}: rows of {in_f} input columns cannot be stored in group-wise blocks (not a multiple of 32)")
    n_groups = sc[3][0]
    if sc[3][1] != out_f:
        raise QConvertError(f"{prefix}.scales has shape {list(sc[3])}, expected [groups, {out_f}]")
    if qz[3] != (n_groups, out_f * bits // 32) or (out_f * bits) % 32:
        raise QConvertError(f"{prefix}.qzeros has shape {list(qz[3])}, expected [{n_groups}, {out_f * bits / 32:g}]")
    # the column -> group map (small: read it now to know the block group and permutation)
    if gi is not None:
        gidx = _read(gi).astype(np.int64)
        if gidx.size and (gidx.min() < 0 or gidx.max() >= n_groups):
            raise QConvertError(f"{prefix}.g_idx has group indices outside 0..{n_groups - 1}")
    else:
        G = in_f if info.group_size == -1 else info.group_size
        gidx = np.arange(in_f, dtype=np.int64) // G
        if gidx.max() >= n_groups:
            raise QConvertError(f"{prefix}.scales has {n_groups} groups; rows of {in_f} in groups of {G} need {gidx.max() + 1}")
    g = _block_group(np.bincount(gidx, minlength=n_groups), in_f, prefix, "GPTQ g_idx")
    perm = None if np.all(np.diff(gidx) >= 0) else np.argsort(gidx, kind="stable")
    from ..blocks.groupwise import type_name

    params = {"input_perm": [int(i) for i in perm]} if perm is not None else {}

    def load_raw() -> np.ndarray:
        q = unpack_stream(_read(qw), bits, in_f)  # (in, out)
        zw = _read(qz)
        if info.fmt == "gptq":  # v1: stored zero - 1
            if bits == 3:
                z = (unpack_stream(zw.T, 3, out_f).T + 1) & 7
            else:
                one_each = np.uint32(sum(1 << (bits * j) for j in range(32 // bits)))
                z = unpack_stream((zw.view(np.uint32) + one_each).T, bits, out_f).T
        else:
            z = unpack_stream(zw.T, bits, out_f).T
        return _encode(prefix, q, z, _scales(sc, prefix), gidx, bits, g, perm).raw.reshape(-1)

    return PrequantizedTensor(f"{prefix}.weight", (out_f, in_f), type_name(bits, g), load_raw, params=params)


def _unpack_awq(words: np.ndarray, n_out: int) -> np.ndarray:
    """int32 (R, out / 8), AWQ's interleaved nibbles -> (R, out) uint8."""
    w = np.ascontiguousarray(words).view(np.uint32)
    rows, cols = w.shape
    nib = np.empty((rows, cols, 8), np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        nib[:, :, col] = (w >> np.uint32(4 * i)) & np.uint32(15)
    return nib.reshape(rows, cols * 8)[:, :n_out]


def _awq_tensor(prefix: str, parts: dict, info: QuantInfo) -> PrequantizedTensor:
    if "g_idx" in parts:
        raise QConvertError(f"{prefix}.g_idx in an AWQ checkpoint: the GEMM layout has no g_idx")
    qw = _need(parts, prefix, "qweight", ("I32",), 2, "awq")
    qz = _need(parts, prefix, "qzeros", ("I32",), 2, "awq")
    sc = _need(parts, prefix, "scales", ("F16", "F32", "BF16"), 2, "awq")
    in_f, packed = qw[3]
    n_groups, out_f = sc[3]
    if packed * 8 != out_f:
        raise QConvertError(f"{prefix}.qweight has shape {list(qw[3])}; {out_f} output columns take {out_f / 8:g} words")
    if qz[3] != (n_groups, packed):
        raise QConvertError(f"{prefix}.qzeros has shape {list(qz[3])}, expected [{n_groups}, {packed}]")
    if n_groups <= 0 or in_f % n_groups:
        raise QConvertError(f"{prefix}: {n_groups} groups do not divide rows of {in_f} input columns")
    G = in_f // n_groups
    if info.group_size not in (-1, G):
        raise QConvertError(f"{prefix}: groups of {G} columns, but the config says group_size {info.group_size}")
    gidx = np.arange(in_f, dtype=np.int64) // G
    g = _block_group(np.bincount(gidx, minlength=n_groups), in_f, prefix, "AWQ")
    from ..blocks.groupwise import type_name

    def load_raw() -> np.ndarray:
        q = _unpack_awq(_read(qw), out_f)  # (in, out)
        z = _unpack_awq(_read(qz), out_f)  # (groups, out)
        return _encode(prefix, q, z, _scales(sc, prefix), gidx, 4, g, None).raw.reshape(-1)

    return PrequantizedTensor(f"{prefix}.weight", (out_f, in_f), type_name(4, g), load_raw)


# --- the converter's side -------------------------------------------------------------------


def import_plans(plans: list, by_tensor: dict[str, SourceTensor]) -> list:
    """``qconvert quantize`` of a GPTQ/AWQ checkpoint with the default method: every imported
    matrix keeps its blocks, every other matrix its source float type (``--tensor-type``
    overrides still apply, re-quantizing from the dequantized weights)."""
    from dataclasses import replace

    from ..blocks import by_name

    out = []
    for p in plans:
        t = by_tensor[p.name]
        if p.reason == "--tensor-type":
            out.append(p)
        elif is_prequantized(t):
            out.append(replace(p, type_name=t.dtype, reason="imported"))
        elif len(p.shape) >= 2 and by_name(t.dtype).is_float:
            out.append(replace(p, type_name=t.dtype, reason="as-is"))
        else:
            out.append(p)
    return out


__all__ = ["Collector", "PrequantizedTensor", "QuantInfo", "detect", "import_plans", "is_prequantized", "unpack_stream"]
