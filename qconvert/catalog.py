"""What qconvert offers, as data: the methods with their size and quality, which options each
method reads, and the architectures it converts. The CLI's help, its option checks and its
"did you mean" all read these tables, so they cannot disagree with each other.
"""

from __future__ import annotations

import difflib

from .methods.mixes import K_MIXES
from .recipe import CALIBRATED_METHODS

# f32/f16/bf16 store every matrix in a float type: the unquantized reference that eval
# compares against (a quantized source such as a Q4_1 GGUF is dequantized into it).
FLOAT_METHODS = ("f32", "f16", "bf16")
# every --method of quantize; w8a8: int8 weights per channel x int8 activations
METHODS = ("rtn", *CALIBRATED_METHODS, "nf4", *FLOAT_METHODS, *K_MIXES, "w8a8")


def method_names() -> tuple[str, ...]:
    """quantize's methods and "import" (a GPTQ/AWQ checkpoint as it is)."""
    return (*METHODS, "import")

# (method and options, block type of the matrices, SmolLM2-135M file size, mean KLD vs F32).
# Sizes and KLDs are BENCHMARKS.md's measurements (SmolLM2-135M-Instruct, wikitext-2 test,
# 512-token windows); "-" where it has none. Bits per weight come from the block registry.
METHOD_TABLE = (
    ("f32", "F32", "514 MiB", "0 (the reference)"),
    ("f16, bf16", "F16", "-", "-"),
    ("rtn -b 8", "Q8_0", "137.5 MiB", "0.0012"),
    ("w8a8", "W8A8", "-", "-"),
    ("q6_k", "Q6_K", "131.4 MiB", "0.0053"),
    ("rtn -b 5 [--asym]", "Q5_0/Q5_1", "-", "-"),
    ("q5_k_m, q5_k_s", "Q5_K", "106.4 MiB", "0.074 (q5_k_m)"),
    ("q4_k_m, q4_k_s", "Q4_K", "100.0 MiB", "0.054 (q4_k_m)"),
    ("q4_k_m --calib TEXT", "Q4_K", "100.0 MiB", "0.032"),
    ("iq4_nl", "IQ4_NL", "-", "-"),
    ("iq4_xs", "IQ4_XS", "-", "-"),
    ("rtn -b 4 [--asym]", "Q4_0/Q4_1", "86.9 MiB", "0.303 (Q4_0)"),
    ("awq -b 4", "I4G128", "84.7 MiB", "0.205"),
    ("gptq -b 4 --asym --act-order", "I4G128", "85.3 MiB", "0.258"),
    ("rtn -b 4 -g 128 --asym", "I4G128", "84.7 MiB", "0.351"),
    ("nf4", "NF4_DQ", "82.3 MiB", "0.270"),
    ("q3_k_m, q3_k_s, q3_k_l", "Q3_K", "88.6 MiB", "0.143 (q3_k_m)"),
    ("gptq -b 3 --asym --act-order --mse", "I3G128", "72.7 MiB", "0.998"),
    ("q2_k", "Q2_K", "83.6 MiB", "0.441"),
)


# Options that only some methods read: (option as typed, quantize's parameter name, methods).
# A method outside the list would ignore the option, so giving it is an error.
METHOD_OPTIONS = (
    ("--bits", "bits", ("rtn", "gptq", "awq", "w8a8")),
    ("--group", "group", ("rtn", "gptq", "awq")),
    ("--sym/--asym", "sym", ("rtn", "gptq")),
    ("--act-order", "act_order", ("gptq",)),
    ("--static-groups", "static_groups", ("gptq",)),
    ("--damp", "damp", ("gptq",)),
    ("--calib-samples", "calib_samples", ("gptq", "awq", "w8a8")),
    ("--calib-seqlen", "calib_seqlen", ("gptq", "awq", "w8a8")),
    ("--seed", "seed", ("gptq", "awq", "w8a8")),
    ("--calib", "calib", ("rtn", "gptq", "awq", "w8a8", *K_MIXES)),
    ("--chunks", "chunks", ("rtn", *K_MIXES)),
    ("--imatrix", "imatrix", ("rtn", "gptq", "awq", *K_MIXES)),
    ("--double-quant/--no-double-quant", "double_quant", ("nf4",)),
    ("--observer", "observer", ("w8a8",)),
    ("--smooth", "smooth", ("w8a8",)),
    ("--act-mode", "act_mode", ("w8a8",)),
)


def ignored_options(method: str, given: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(option, methods that read it) for each option in ``given`` (parameter names) that
    ``method`` would ignore."""
    return [(opt, methods) for opt, param, methods in METHOD_OPTIONS if param in given and method not in methods]


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_method_message(method: str) -> str:
    names = method_names()
    return f"unknown method {method!r}{did_you_mean(method, names)}; available: {', '.join(names)}"


def supported_architectures() -> dict[str, tuple[str, ...]]:
    """Model types each input reads: Hugging Face config model_type, GGUF general.architecture."""
    from .arch import supported_gguf_architectures, supported_model_types

    return {"hf": tuple(supported_model_types()), "gguf": tuple(supported_gguf_architectures()), "onnx": ("any graph",)}


def method_table_text() -> str:
    """The method table as plain text, bits per weight of the matrices from the block registry."""
    from .blocks import by_name

    def bpw(type_names: str) -> str:
        n = 12288  # a row length every block and group size divides
        return "/".join(f"{8 * by_name(t).nbytes((1, n)) / n:g}" for t in type_names.split("/"))

    rows = [("method", "bits/weight", "file", "mean KLD")]
    rows += [(m, bpw(t), size, kld) for m, t, size, kld in METHOD_TABLE]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines + ["(file and mean KLD vs F32: SmolLM2-135M on wikitext-2, BENCHMARKS.md)"])
