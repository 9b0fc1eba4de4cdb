"""The Python API: one function per command of the CLI, with the same options and checks.

    import qconvert
    qconvert.quantize("../shared/models/stories260K", "s.q8", method="rtn", bits=8)
    print(qconvert.generate("s.q8", "Once upon a time", max_tokens=20).text)
    qconvert.evaluate("s.q8", "wiki.test.raw", reference="s.f32", chunks=4)   # EvalResult(ppl=...)
    qconvert.export("s.q8", "s.gguf")
    qconvert.imatrix("s.q8", "calibration.txt", "imatrix.gguf")             # llama.cpp's format

``model`` and ``reference`` arguments take a container path, an open container, or (where the
CLI does) a source that is converted to a temporary F32 container first. Outputs follow the
same rules as the CLI, except that an existing output file is overwritten (as ``open(path, "w")``
does); an output that is an input, a file inside an input folder, or a directory is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .container import Container, open_container
from .errors import QConvertError
from .evaluate import EvalResult
from .outputs import check_output, remove_stale_temps

Progress = Callable[[int, int], None]


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def open_model(spec: str | Path | Container, stack: contextlib.ExitStack,
               note: Callable[[str], None] | None = None) -> Container:
    """A container as it is (an open one, or a path to one); any other source is converted to a
    temporary F32 container that lives as long as ``stack``."""
    import tempfile

    from .container.format import MAGIC

    if isinstance(spec, Container):
        return spec
    p = Path(spec)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == MAGIC:
                return stack.enter_context(open_container(p))
    from .convert import quantize

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qconvert-ref-")))
    if note is not None:
        note(f"converting {spec} to F32 ...")
    quantize(spec, tmp / "reference.q", method="f32")
    return stack.enter_context(open_container(tmp / "reference.q"))


def inspect(model: str | Path, verify: bool = False) -> dict[str, Any]:
    """What ``qconvert inspect --json`` prints: header, provenance, recipe, tensor table, totals."""
    from .summary import summarize

    with open_container(model) as c:
        info = summarize(c, verify=verify)
        if c.architecture == "onnx":
            from .onnx import onnx_summary

            info["onnx"] = onnx_summary(c)
    return info


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation, special tokens left out
    ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    decode_tokens_per_s: float

    def __repr__(self) -> str:
        return f"Generation({self.generated_tokens} tokens, {self.decode_tokens_per_s:.1f} tokens/s: {_short(self.text)!r})"


def generate(model: str | Path | Container, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Continue ``prompt`` with a language model (``qconvert run``); ``on_text`` receives the text
    as it is generated."""
    from .runtime.generate import generate as run_generation
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer

    with contextlib.ExitStack() as stack:
        c = open_model(model, stack)
        lm = load_model(c)
        if not hasattr(lm, "forward"):
            raise QConvertError(f"{c.architecture} is an encoder; it does not generate (use qconvert.embed)")
        tok = Tokenizer.from_container(c)
        if chat:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
        else:
            ids = tok.encode(prompt)
        stream = tok.decode_stream(skip_special=True, context=ids)

        def on_token(token: int) -> None:
            if on_text is not None:
                on_text(stream.step(token))

        stats = run_generation(lm, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_ids=set(tok.eos_ids), on_token=on_token)
        if on_text is not None:
            on_text(stream.flush())
        return Generation(prompt, tok.decode(stats.ids, skip_special=True), stats.ids, stats.prompt_tokens,
                          stats.generated_tokens, stats.prompt_tps, stats.decode_tps)


run = generate  # the CLI calls it `qconvert run`


def embed(model: str | Path | Container, text: str) -> np.ndarray:
    """The sentence embedding of ``text`` with an encoder (BERT), as ``qconvert run --text``."""
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer

    with contextlib.ExitStack() as stack:
        c = open_model(model, stack)
        if c.architecture != "bert":
            raise QConvertError(f"embeddings come from encoders (bert); this is a {c.architecture} model")
        return load_model(c).embed(Tokenizer.from_container(c).encode(text))


def evaluate(model: str | Path | Container, text: str | Path, reference: str | Path | Container | None = None,
             ctx: int = 512, chunks: int | None = None, bos: bool | None = None, progress: Progress | None = None,
             note: Callable[[str], None] | None = None) -> EvalResult:
    """Perplexity of ``model`` on the text file ``text`` (llama.cpp's protocol), and with a
    ``reference`` KL divergence, top-1 agreement and RMS dp (``qconvert eval``)."""
    from .evaluate import evaluate as run_evaluation
    from .evaluate import read_text
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer

    with contextlib.ExitStack() as stack:
        c = open_model(model, stack, note)
        lm = load_model(c)
        if not hasattr(lm, "forward"):
            raise QConvertError(f"eval measures language models; {c.architecture} is an encoder")
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(read_text(text), add_bos=False)
        add_bos = tok.add_bos_default if bos is None else bos
        ref_model = None
        if reference is not None:
            ref_model = load_model(open_model(reference, stack, note))
            if ref_model.vocab_size != lm.vocab_size:
                raise QConvertError("the reference has a different vocabulary; KLD needs the same tokenizer")
        return run_evaluation(lm, tokens, ctx=ctx, chunks=chunks, bos_id=tok.bos_id if add_bos else None,
                              reference=ref_model, progress=progress)


@dataclass
class Export:
    output: Path
    format: str  # "gguf" or "onnx"
    summary: dict[str, Any]  # what the exporter reports (tensors, types, file_bytes ...)

    def __repr__(self) -> str:
        return f"Export(output={str(self.output)!r}, format={self.format!r}, bytes={self.summary.get('file_bytes')})"


def export(model: str | Path, output: str | Path, to: str = "gguf", allow_requantize: bool = False) -> Export:
    """Write a container as GGUF (llama.cpp; blocks copied, not re-quantized) or, for a container
    made from an ONNX model, as a QDQ ONNX model (``qconvert export``)."""
    fmt = to.lower()
    if fmt not in ("gguf", "onnx"):
        from .catalog import did_you_mean

        raise QConvertError(f"unknown export format {to!r}{did_you_mean(to, ('gguf', 'onnx'))}; available: gguf, onnx")
    output = check_output(output, inputs=[model], force=True)
    remove_stale_temps(output)
    with open_container(model) as c:
        if fmt == "onnx":
            from .onnx import export_qdq, is_onnx_container

            if not is_onnx_container(c):
                raise QConvertError(f"--to onnx exports containers made from ONNX models; {model} holds a {c.architecture} model")
            return Export(output, fmt, export_qdq(c, output))
        from .export.gguf import export_gguf

        return Export(output, fmt, export_gguf(c, output, allow_requant=allow_requantize))


@dataclass
class Imatrix:
    importance: dict[str, np.ndarray]  # weight matrix name -> mean x^2 per input column
    info: dict[str, Any]  # tokens, windows, calibration text hash ...
    output: Path | None

    def __repr__(self) -> str:
        where = f", output={str(self.output)!r}" if self.output is not None else ""
        return f"Imatrix({len(self.importance)} matrices, {self.info.get('tokens')} tokens{where})"


def imatrix(model: str | Path | Container, calib: str | Path, output: str | Path | None = None, ctx: int = 512,
            chunks: int | None = None, progress: Progress | None = None,
            note: Callable[[str], None] | None = None) -> Imatrix:
    """Collect an importance matrix (mean x^2 per input column of each weight matrix) over the
    text file ``calib``, and write it to ``output``: llama.cpp's imatrix.dat for a .dat name,
    its GGUF imatrix for .gguf, a qconvert container otherwise (``qconvert imatrix``)."""
    from .evaluate import read_text
    from .imatrix import collect_imatrix, save_imatrix
    from .imatrix_files import llama_format_for, write_llama_imatrix

    if output is not None:
        output = check_output(output, inputs=[model, calib], force=True)
        remove_stale_temps(output)
    text = read_text(calib)
    with contextlib.ExitStack() as stack:
        c = open_model(model, stack, note)
        importance, info = collect_imatrix(c, text, ctx=ctx, chunks=chunks, progress=progress)
    info["calibration_file"] = Path(calib).name
    if output is not None:
        fmt = llama_format_for(output)
        if fmt is None:
            save_imatrix(output, importance, info)
        else:
            write_llama_imatrix(output, importance, info, fmt)
        info["format"] = fmt or "qconvert container"
    return Imatrix(importance, info, None if output is None else Path(output))
