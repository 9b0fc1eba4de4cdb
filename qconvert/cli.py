"""The ``qconvert`` command line: thin wrappers that parse options and call the library.

Exit codes: 0 success, 1 bad input or options (one line on stderr), 2 usage error,
3 quality gate failed, 70 internal error (a bug: rerun with --debug for the traceback),
130 interrupted.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import QConvertError

app = typer.Typer(
    name="qconvert",
    help="Turn model checkpoints into a portable, versioned, block-quantized file - and prove it still works.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
DEBUG = False

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def _handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except QConvertError as e:
            if DEBUG:
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; no output was written")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            if DEBUG:
                raise
            err.print(
                f"[bold red]internal error:[/] {type(e).__name__}: {e} (this is a bug in qconvert; rerun with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import numba

    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise QConvertError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}")
    numba.set_num_threads(threads)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"qconvert {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


@app.command()
@_handle_errors
def quantize(
    source: str = typer.Argument(..., help="HF folder, hub id (owner/name), .gguf or .onnx file, or demo:stories260K (packaged with qconvert)."),
    output: Path = typer.Option(..., "-o", "--output", help="Container file to write."),
    method: str = typer.Option("rtn", "--method", "-m", help="rtn (--bits/--group/--asym); gptq or awq (--calib); import (a GPTQ/AWQ checkpoint as it is — the default for one); nf4 (bitsandbytes NF4, 64-weight blocks); w8a8 (int8 weights and activations: --calib, --observer, --smooth, --act-mode); a llama.cpp K-quant mix: q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k; or f32/f16/bf16 (unquantized reference)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Bits per weight: rtn 4/5/8 (or 2/3 with --group), gptq/awq 2/3/4/8 (default: rtn 8, gptq/awq 4)."),
    group: Optional[int] = typer.Option(None, "--group", "-g", help="Weights per scale: 32 (GGML blocks), or 64/128 (group-wise I{bits}G{group}; gptq/awq use 128 by default)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (Q4_0/Q5_0/Q8_0) or with a min (Q4_1/Q5_1)."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Regex of tensor names to leave unquantized, e.g. 'lm_head|embed'."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE per-tensor override, e.g. 'down_proj=q8_0' (repeatable)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix from `qconvert imatrix` (weights the K-quant and Q4/Q5 searches)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text: compute an importance matrix from it first. For an .onnx model: a folder of .npy/.npz model inputs (static activation ranges, --observer)."),
    calib_chunks: Optional[int] = typer.Option(None, "--calib-chunks", help="Use only this many 512-token windows of --calib (imatrix)."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="GPTQ/AWQ/W8A8: calibration windows sampled from --calib (default: built-in text)."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="GPTQ/AWQ/W8A8: tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="GPTQ/AWQ/W8A8: seed of the calibration sampling."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ: dampening, as a fraction of the mean Hessian diagonal."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns by descending Hessian diagonal."),
    static_groups: bool = typer.Option(False, "--static-groups", help="GPTQ: fit group parameters before the updates (with --act-order)."),
    mse: bool = typer.Option(False, "--mse", help="GPTQ and group-wise rtn: shrink each group's min/max range where that lowers its rounding error (GPTQ's mse option; helps GPTQ at 2-3 bits)."),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="NF4: quantize the block absmax values again (bitsandbytes' compress_statistics)."),
    observer: str = typer.Option("minmax", "--observer", help="w8a8 static activation ranges: minmax, percentile, entropy or mse."),
    smooth: Optional[float] = typer.Option(None, "--smooth", help="w8a8: SmoothQuant migration strength alpha in [0, 1] (e.g. 0.5); llama-family models."),
    act_mode: str = typer.Option("static", "--act-mode", help="w8a8 activations: static (one calibrated scale per tensor) or dynamic (per token at run time)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize a checkpoint into a qconvert container.

    Example: qconvert quantize demo:stories260K --method rtn --bits 8 -o s.q8
    """
    from .convert import quantize as run_quantize

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[tensor]}"),
        console=err,
        transient=True,
        disable=quiet or as_json or not err.is_terminal,
    ) as bar:
        task = bar.add_task("quantizing", total=None, tensor="")

        def progress(i: int, total: int, plan: Any) -> None:
            bar.update(task, completed=i, total=total, tensor=f"{plan.name} -> {plan.type_name}")

        result = run_quantize(
            source, output, method=method, bits=bits, group=group, sym=sym, keep=keep,
            tensor_types=tensor_type, revision=revision, imatrix=imatrix, calib=calib, calib_chunks=calib_chunks,
            calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, damp=damp, act_order=act_order,
            static_groups=static_groups, mse=mse, double_quant=double_quant, progress=progress, observer=observer, smooth=smooth, act_mode=act_mode,
            calib_progress=lambda i, n: bar.update(task, description="calibrating", completed=i, total=n),
        )
    types: dict[str, int] = {}
    for p in result.plans:
        types[p.type_name] = types.get(p.type_name, 0) + 1
    size = result.output.stat().st_size
    notes = sorted({f"{p.reason} -> {p.type_name}" for p in result.plans if p.reason.startswith("fallback")})
    if as_json:
        print(json.dumps({"output": str(result.output), "file_bytes": size, "seconds": round(result.seconds, 3),
                          "tensors": len(result.plans), "types": types, "notes": notes}, indent=2))
        return
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    type_text = ", ".join(f"{n}x {t}" for t, n in sorted(types.items()))
    out.print(f"wrote {result.output} ({_human_bytes(size)}, {len(result.plans)} tensors: {type_text}) in {result.seconds:.1f} s", highlight=False)


@app.command()
@_handle_errors
def inspect(
    path: Path = typer.Argument(..., help="Container file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Check every tensor's checksum (exit 1 if any fails)."),
) -> None:
    """Show a container's header, provenance, recipe and tensor table.

    Example: qconvert inspect s.q8 --json
    """
    from .container import open_container
    from .summary import summarize

    with open_container(path) as c:
        info = summarize(c, verify=verify)
        if c.architecture == "onnx":
            from .onnx import onnx_summary

            info["onnx"] = onnx_summary(c)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        _print_summary(info)
    if verify and info["corrupt_tensors"]:
        raise QConvertError(f"{len(info['corrupt_tensors'])} tensors fail their checksum: {', '.join(info['corrupt_tensors'][:5])}")


def _print_summary(info: dict) -> None:
    tot = info["totals"]
    out.print(f"[bold]{info['path']}[/]  qconvert container v{info['format_version']}, {_human_bytes(info['file_bytes'])}, written by qconvert {info['qconvert_version']}")
    out.print(f"architecture: {info['architecture']}  " + "  ".join(f"{k}={v}" for k, v in info["config"].items()), highlight=False)
    src = info["source"]
    src_line = f"source: {src.get('kind')} {src.get('id')}"
    if src.get("revision") or src.get("commit"):
        src_line += f" @ {src.get('commit') or src.get('revision')}"
    if src.get("quantized"):
        src_line += f"  (already quantized: {src.get('source_types')})"
    out.print(src_line, highlight=False)
    for f in src.get("files", []):
        out.print(f"  {f['name']}  {f['bytes']} bytes  sha256 {f.get('sha256', '-')}", highlight=False)
    out.print("recipe: " + json.dumps(info["recipe"]), highlight=False)
    table = Table(show_header=True, header_style="bold", box=None)
    for col, justify in (("tensor", "left"), ("shape", "left"), ("type", "left"), ("bytes", "right"), ("bpw", "right")):
        table.add_column(col, justify=justify)
    for t in info["tensors"]:
        table.add_row(t["name"], "x".join(map(str, t["shape"])), t["type"], f"{t['bytes']:,}", f"{t['bits_per_weight']:.3f}")
    out.print(table)
    ratio = (
        f"; compression {tot['compression_ratio']:.2f}x vs the source's {_human_bytes(tot['source_tensor_bytes'])}"
        if tot["compression_ratio"]
        else ""
    )
    out.print(
        f"total: {tot['tensors']} tensors, {tot['parameters']:,} parameters, {_human_bytes(tot['tensor_bytes'])},"
        f" {tot['bits_per_weight']:.3f} bits per weight{ratio}; types: "
        + ", ".join(f"{n}x {t}" for t, n in tot["types"].items()),
        highlight=False,
    )
    if "onnx" in info:
        _print_onnx(info["onnx"])
    if "corrupt_tensors" in info:
        out.print("checksums: " + ("all tensors OK" if not info["corrupt_tensors"] else f"{len(info['corrupt_tensors'])} corrupt"))


def _print_onnx(o: dict) -> None:
    out.print(f"ONNX graph: {o['nodes']} nodes: " + ", ".join(f"{n}x {op}" for op, n in o["ops"].items()), highlight=False)
    out.print("inputs: " + "; ".join(o["inputs"]) + "  outputs: " + "; ".join(o["outputs"]), highlight=False)
    acts = o["activations"]
    out.print(f"weights: {o['quantized_weights']} of {len(o['weights'])} quantized; activations: "
              + (f"{acts['tensors']} tensors, {acts['dtype']} static ({acts['observer']})" if acts else "float (weight-only)"),
              highlight=False)
    table = Table(show_header=True, header_style="bold", box=None)
    for col in ("weight", "op", "onnx shape", "layout", "from", "scheme"):
        table.add_column(col)
    for w in o["weights"]:
        table.add_row(w["name"], "/".join(w["ops"]), "x".join(map(str, w["shape"])), w["layout"], w["origin"],
                      w["scheme"] + ("" if w["quantized"] else " (float)"))
    out.print(table)


@app.command()
@_handle_errors
def run(
    path: Path = typer.Argument(..., help="Container file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (language models)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text to embed (BERT encoders)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample from the smallest set with this much probability."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling (same seed, same text)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of streaming it."),
    inputs: List[str] = typer.Option([], "--input", "-i", help="ONNX models: input FILE.npy, NAME=FILE.npy (repeatable) or FILE.npz."),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o", help="ONNX models: write the output(s) to FILE.npy (.npz for several)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="ONNX models: onnxruntime or reference (default: onnxruntime when installed)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-j", help="CPU threads for the kernels (default: all cores; 1 is steadier on a busy machine)."),
) -> None:
    """Generate text with a container's model on the CPU (or embed text with an encoder).

    Example: qconvert run s.q8 --prompt "Once upon a time" --max-tokens 30
    """
    from .container import open_container
    from .runtime.generate import generate
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer

    _set_threads(threads)
    with open_container(path) as c:
        if c.architecture == "onnx":
            return _run_onnx(c, inputs, output_file, engine, as_json)
        model = load_model(c)
        tok = Tokenizer.from_container(c)
        if c.architecture == "bert":
            if text is None:
                raise QConvertError("this is an encoder: give --text to embed (it does not generate)")
            vec = model.embed(tok.encode(text))
            if as_json:
                print(json.dumps({"text": text, "dim": int(vec.size), "embedding": [float(v) for v in vec]}))
            else:
                print(" ".join(f"{v:.6f}" for v in vec))
            return
        if prompt is None:
            raise QConvertError("give --prompt TEXT to generate from")
        if chat:
            prompt_text = tok.apply_chat_template([{"role": "user", "content": prompt}])
            ids = tok.encode(prompt_text, add_bos=False)
        else:
            ids = tok.encode(prompt)
        stream = tok.decode_stream(skip_special=True, context=ids)
        if not as_json:
            sys.stdout.write(prompt if not chat else "")
            sys.stdout.flush()

        def on_token(token: int) -> None:
            if not as_json:
                sys.stdout.write(stream.step(token))
                sys.stdout.flush()

        stats = generate(model, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, stop_ids=set(tok.eos_ids), on_token=on_token)
    if as_json:
        print(json.dumps({
            "prompt": prompt, "text": tok.decode(stats.ids, skip_special=True), "ids": stats.ids,
            "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "prompt_tokens_per_s": round(stats.prompt_tps, 2), "decode_tokens_per_s": round(stats.decode_tps, 2),
        }, indent=2))
        return
    sys.stdout.write(stream.flush() + "\n")
    err.print(
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens/s;"
        f" generation: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tokens/s",
        highlight=False,
    )


@app.command()
@_handle_errors
def imatrix(
    model: str = typer.Argument(..., help="Container, or source (HF folder / hub id / .gguf) to run."),
    calib: Path = typer.Option(..., "--calib", help="Calibration text file."),
    output: Path = typer.Option(..., "-o", "--output", help="Importance-matrix file to write."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Use only the first N windows."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Collect an importance matrix (mean x^2 per input column of every weight matrix).

    Example: qconvert imatrix smollm2.f32 --calib input.txt --chunks 32 -o imatrix.dat
    """
    import contextlib

    from .evaluate import read_text
    from .imatrix import collect_imatrix, save_imatrix

    text = read_text(calib)
    with contextlib.ExitStack() as stack:
        c = _open_reference(model, stack)
        with Progress(TextColumn("[bold]imatrix"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task("imatrix", total=None)
            importance, info = collect_imatrix(c, text, ctx=ctx, chunks=chunks,
                                               progress=lambda i, n: bar.update(task, completed=i, total=n))
    info["calibration_file"] = calib.name
    save_imatrix(output, importance, info)
    if as_json:
        print(json.dumps({"output": str(output), "entries": len(importance), **info}, indent=2))
    else:
        out.print(f"wrote {output}: {len(importance)} matrices, {info['tokens']} tokens in {info['chunks']} windows", highlight=False)


@app.command()
@_handle_errors
def export(
    path: Path = typer.Argument(..., help="Container file."),
    to: str = typer.Option(..., "--to", help="Target format: gguf, or onnx (a QDQ model; ONNX containers)."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write."),
    allow_requant: bool = typer.Option(False, "--allow-requant", help="Convert tensors whose type the target lacks (to Q8_0) instead of refusing."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Export a container to GGUF (llama.cpp), copying every tensor's blocks unchanged.

    Example: qconvert export smollm2.q4_k_m --to gguf -o smollm2.Q4_K_M.gguf
    """
    from .container import open_container

    if to.lower() == "onnx":
        return _export_onnx(path, output, as_json)
    if to.lower() != "gguf":
        raise QConvertError(f"unknown export format {to!r}; available: gguf, onnx")
    from .export.gguf import export_gguf

    with open_container(path) as c:
        summary = export_gguf(c, output, allow_requant=allow_requant)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        types = ", ".join(f"{n}x {t}" for t, n in sorted(summary["types"].items()))
        out.print(f"wrote {output} (GGUF v3, {_human_bytes(summary['file_bytes'])}, {summary['tensors']} tensors: {types})", highlight=False)


def _run_onnx(c: Any, inputs: List[str], output_file: Optional[Path], engine: Optional[str], as_json: bool) -> None:
    """``run`` for ONNX containers: the stored graph on --input arrays (see qconvert/onnx/runner.py)."""
    import numpy as np

    from .onnx.calibrate import parse_run_inputs
    from .onnx.model import input_specs, stored_graph
    from .onnx.runner import Runner

    feeds = parse_run_inputs(inputs, input_specs(stored_graph(c)))
    runner = Runner(c, engine)
    try:
        outputs = runner.run(feeds)
    finally:
        runner.close()
    if output_file is not None:
        if output_file.suffix.lower() == ".npz":
            np.savez(output_file, **outputs)
        elif len(outputs) == 1:
            np.save(output_file, next(iter(outputs.values())))
        else:
            raise QConvertError(f"the model has {len(outputs)} outputs ({', '.join(outputs)}); give --output FILE.npz")
    summary = {name: {"shape": list(v.shape), "dtype": str(v.dtype),
                      **({"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean())}
                         if v.size and v.dtype.kind == "f" else {})} for name, v in outputs.items()}
    if as_json:
        print(json.dumps({"engine": runner.engine, "engine_version": runner.engine_label, "mode": runner.mode,
                          "output_file": None if output_file is None else str(output_file), "outputs": summary}, indent=2))
        return
    err.print(f"ran with {runner.engine_label}: {runner.mode}", highlight=False)
    for name, s in summary.items():
        stats = f"  min {s['min']:.6g} max {s['max']:.6g} mean {s['mean']:.6g}" if "min" in s else ""
        out.print(f"{name}: {s['dtype']} {s['shape']}{stats}", highlight=False)
    if output_file is not None:
        out.print(f"wrote {output_file}", highlight=False)


def _export_onnx(path: Path, output: Path, as_json: bool) -> None:
    from .container import open_container
    from .onnx import export_qdq, is_onnx_container

    with open_container(path) as c:
        if not is_onnx_container(c):
            raise QConvertError(f"--to onnx exports containers made from ONNX models; {path} holds a {c.architecture} model")
        summary = export_qdq(c, output)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    w = summary["weights"]
    out.print(f"wrote {output} (QDQ ONNX, opset {summary['opset']}, {_human_bytes(summary['file_bytes'])}: weights"
              f" {w['per_channel']} per-channel int8, {w['blocked']} block-wise, {w['nbits']} MatMulNBits, {w['float']} float;"
              f" {summary['activations']} activation Q/DQ pairs)", highlight=False)


def _open_reference(spec: str, stack: Any) -> Any:
    """A container file as is; anything else is a source, converted to a temporary F32 container."""
    import tempfile

    from .container import open_container
    from .container.format import MAGIC

    p = Path(spec)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == MAGIC:
                return stack.enter_context(open_container(p))
    from .convert import quantize as run_quantize

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qconvert-ref-")))
    err.print(f"converting reference {spec} to F32 ...", highlight=False)
    run_quantize(spec, tmp / "reference.q", method="f32")
    return stack.enter_context(open_container(tmp / "reference.q"))


@app.command(name="eval")
@_handle_errors
def eval_cmd(
    path: Path = typer.Argument(..., help="Container file."),
    text: Path = typer.Option(..., "--text", help="Evaluation text (e.g. wiki.test.raw); CRLF is normalised."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Container, or source (HF folder / .gguf), to compare against: KLD, top-1 agreement, RMS dp."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Evaluate only the first N windows."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Put BOS first in each window (default: when the tokenizer adds BOS)."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Fail (exit 3) if PPL / reference PPL exceeds this."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Fail (exit 3) if the mean KL divergence exceeds this."),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", help="Fail (exit 3) if the perplexity exceeds this."),
    threads: Optional[int] = typer.Option(None, "--threads", "-j", help="CPU threads for the kernels (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Perplexity (llama.cpp's protocol), and KL divergence against a reference.

    Example: qconvert eval s.q4 --text wiki.test.raw --reference s.f32 --max-kld 0.05
    """
    import contextlib

    from .container import open_container
    from .errors import QualityGateError
    from .evaluate import evaluate, read_text
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer

    _set_threads(threads)
    if (max_ppl_ratio is not None or max_kld is not None) and reference is None:
        raise QConvertError("--max-ppl-ratio and --max-kld need --reference")
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(open_container(path))
        model = load_model(c)
        if not hasattr(model, "forward"):
            raise QConvertError(f"eval measures language models; {c.architecture} is an encoder")
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(read_text(text), add_bos=False)
        add_bos = tok.add_bos_default if bos is None else bos
        ref_model = None
        if reference is not None:
            ref_c = _open_reference(reference, stack)
            ref_model = load_model(ref_c)
            if ref_model.vocab_size != model.vocab_size:
                raise QConvertError("the reference has a different vocabulary; KLD needs the same tokenizer")
        with Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task("eval", total=None)
            result = evaluate(model, tokens, ctx=ctx, chunks=chunks, bos_id=tok.bos_id if add_bos else None,
                              reference=ref_model, progress=lambda i, n: bar.update(task, completed=i, total=n))
    info = result.as_dict()
    info["model"] = str(path)
    info["text"] = str(text)
    failures = []
    ref = result.reference or {}
    if max_ppl is not None and result.ppl > max_ppl:
        failures.append(f"PPL {result.ppl:.4f} > {max_ppl}")
    if max_ppl_ratio is not None and ref["ppl_ratio"] > max_ppl_ratio:
        failures.append(f"PPL ratio {ref['ppl_ratio']:.4f} > {max_ppl_ratio}")
    if max_kld is not None and ref["kld_mean"] > max_kld:
        failures.append(f"mean KLD {ref['kld_mean']:.5f} > {max_kld}")
    info["gate"] = {"passed": not failures, "failures": failures}
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        out.print(f"PPL {result.ppl:.4f} over {result.chunks} windows of {result.ctx} tokens"
                  f" ({result.tokens_scored} scored) in {result.seconds:.1f} s", highlight=False)
        if ref:
            out.print(f"reference PPL {ref['ppl']:.4f}, PPL ratio {ref['ppl_ratio']:.4f}, mean KLD {ref['kld_mean']:.6f}"
                      f" (p99 {ref['kld_p99']:.4f}), same top-1 token {100 * ref['top1_agreement']:.2f}%,"
                      f" RMS dp {100 * ref['rms_dp']:.3f}%", highlight=False)
    if failures:
        raise QualityGateError("quality gate failed: " + "; ".join(failures))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``--debug`` anywhere shows tracebacks."""
    global DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        DEBUG = True
        args = [a for a in args if a != "--debug"]
    app(args=args, prog_name="qconvert")


if __name__ == "__main__":
    main()
