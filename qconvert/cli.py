"""The ``qconvert`` command line: thin wrappers that parse options and call the library
(qconvert/api.py, qconvert/convert.py).

Exit codes: 0 success, 1 bad input or options (one line on stderr), 2 usage error,
3 quality gate failed, 70 internal error (a bug: rerun with --debug for the traceback),
130 interrupted, 143 terminated (SIGTERM). A run that does not finish leaves no output and
no temporary file behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .errors import QConvertError

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DEBUG = False

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


# --- help without typer's type artifacts (<bool>, <str>, {SOURCE}) ---------------------------


class _Argument(TyperArgument):
    def _usage_display_name(self) -> str:
        return self.display_name_raw if self.required else f"[{self.display_name_raw}]"

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None


class _Option(TyperOption):
    def display_type_rich(self, ctx: click.Context) -> str | None:
        if self.is_flag or self.count:
            return None
        return self.metavar or self.name.upper()


def _plain_metavars(params: list) -> list:
    for p in params:
        if type(p) is TyperArgument:
            p.__class__ = _Argument
        elif type(p) is TyperOption:
            p.__class__ = _Option
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: click.Context) -> list:
        return _plain_metavars(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list:
        return _plain_metavars(super().get_params(ctx))


def _app_help() -> str:
    from .catalog import supported_architectures

    archs = supported_architectures()
    return (
        "Turn model checkpoints into a portable, versioned, block-quantized file - and prove it still works.\n\n"
        f"Supported architectures: Hugging Face {', '.join(archs['hf'])}; GGUF {', '.join(archs['gguf'])};"
        " ONNX graphs (weights of MatMul/Gemm/Conv)."
    )


app = typer.Typer(
    name="qconvert",
    help=_app_help(),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=_Group,
)
command = functools.partial(app.command, cls=_Command)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"qconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Options before the command."""


# --- shared pieces ----------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM, raised where the process is so the writers remove their temporary files."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


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
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; no output was written")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Terminated:
            err.print("terminated; no output was written")
            raise typer.Exit(EXIT_TERMINATED) from None
        except Exception as e:
            if DEBUG:
                raise
            err.print(
                f"[bold red]internal error:[/] {escape(f'{type(e).__name__}: {e}')} (this is a bug in qconvert; rerun with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


class _Say:
    """What a command prints besides its result: nothing with --quiet, details with --verbose."""

    def __init__(self, quiet: bool = False, verbose: bool = False, as_json: bool = False) -> None:
        if quiet and verbose:
            raise QConvertError("give --quiet or --verbose, not both")
        self.quiet, self.verbose = quiet or as_json, verbose and not as_json  # --json: only the JSON

    def result(self, text: str) -> None:
        if not self.quiet:
            out.print(text, highlight=False)

    def note(self, text: str) -> None:
        if not self.quiet:
            err.print(text, highlight=False)

    def detail(self, text: str) -> None:
        if self.verbose:
            err.print(text, highlight=False)


def _quiet() -> Any:
    return typer.Option(False, "--quiet", "-q", help="Print nothing but errors (and what --json or run asks for).")


def _verbose() -> Any:
    return typer.Option(False, "--verbose", "-v", help="Print details: per-tensor decisions, per-window numbers.")


def _threads_option() -> Any:
    return typer.Option(None, "--threads", "-j", metavar="N",
                        help="CPU threads for the kernels and BLAS (default: all cores; 1 is steadier on a busy machine).")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """numba's and BLAS's thread counts set to ``n`` for the command, and restored after."""
    if n is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits

    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise QConvertError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}")
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        numba.set_num_threads(before)


class _Bars:
    """One labelled progress bar per phase on stderr (count, elapsed, ETA); off when quiet,
    with --json, or when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[detail]}"),
            console=err, transient=True, disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "_Bars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, label: str, done: int, total: int | None, detail: str = "") -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total, detail="")
        self.progress.update(self.tasks[label], completed=done, total=total, detail=detail)

    def phase(self, label: str) -> Callable[[int, int], None]:
        return lambda done, total: self.update(label, done, total)


def _check_output(output: Path, inputs: list, force: bool) -> None:
    from .outputs import check_output

    check_output(output, inputs=inputs, force=force)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # typer's own click copy: compare by name
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _refuse_ignored_options(ctx: typer.Context, method: str) -> None:
    """One error naming every option the chosen method would ignore."""
    from .catalog import ignored_options
    from .methods.mixes import K_MIXES

    given = {name for name in ctx.params if _given(ctx, name)}
    if "calib_chunks" in given:
        given.add("chunks")
    bad = ignored_options(method, given)
    if not bad:
        return

    def typed(option: str) -> str:  # --sym/--asym -> the one the user typed
        if "/" not in option:
            return option
        on, off = option.split("/")
        param = "sym" if on == "--sym" else "double_quant"
        return on if ctx.params[param] else off

    def users(methods: tuple[str, ...]) -> str:
        names = [m for m in methods if m not in K_MIXES] + (["the llama.cpp mixes (K-quant, IQ4)"] if set(K_MIXES) <= set(methods) else [])
        return ", ".join(names)

    parts = [f"{typed(opt)} (used by {users(methods)})" for opt, methods in bad]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    raise QConvertError(f"--method {method} ignores {listed}; leave {'it' if len(parts) == 1 else 'them'} out")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _quantize_epilog() -> str:
    from .catalog import method_table_text

    return "Methods, largest first:\n\n" + escape(method_table_text())


# --- commands ---------------------------------------------------------------------------------


@command(epilog=_quantize_epilog())
@_handle_errors
def quantize(
    ctx: typer.Context,
    source: str = typer.Argument(..., metavar="SOURCE", help="HF folder, hub id (owner/name), .gguf or .onnx file, a container, or demo:stories260K (packaged with qconvert)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Container file to write."),
    method: str = typer.Option("rtn", "--method", "-m", metavar="METHOD", help="rtn (--bits/--group/--asym); gptq or awq (--calib); import (a GPTQ/AWQ checkpoint as it is — the default for one); nf4 (bitsandbytes NF4, 64-weight blocks); w8a8 (int8 weights and activations: --calib, --observer, --smooth, --act-mode); a llama.cpp K-quant mix: q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k, or an IQ4 mix: iq4_nl iq4_xs; or f32/f16/bf16 (unquantized reference; dequantizes a quantized source)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", metavar="N", help="Bits per weight: rtn 4/5/8 (or 2/3 with --group), gptq/awq 2/3/4/8 (default: rtn 8, gptq/awq 4)."),
    group: Optional[int] = typer.Option(None, "--group", "-g", metavar="N", help="Weights per scale: 32 (GGML blocks), or 64/128 (group-wise I{bits}G{group}; gptq/awq use 128 by default)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (Q4_0/Q5_0/Q8_0) or with a min (Q4_1/Q5_1); rtn and gptq."),
    keep: Optional[str] = typer.Option(None, "--keep", metavar="REGEX", help="Tensor names to leave as the source has them, e.g. 'lm_head|embed'."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", metavar="REGEX=TYPE", help="Per-tensor override, e.g. 'down_proj=q8_0' (repeatable)."),
    revision: Optional[str] = typer.Option(None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", metavar="FILE", help="Importance matrix: from `qconvert imatrix`, or llama.cpp's imatrix.dat / imatrix.gguf (weights the K-quant and Q4/Q5 searches)."),
    calib: Optional[Path] = typer.Option(None, "--calib", metavar="TEXT", help="Calibration text: the importance matrix of rtn and the K-quant mixes, or gptq/awq/w8a8's samples. For an .onnx model: a folder of .npy/.npz model inputs."),
    chunks: Optional[int] = typer.Option(None, "--chunks", metavar="N", help="Importance matrix: use only the first N windows of --calib."),
    calib_chunks: Optional[int] = typer.Option(None, "--calib-chunks", hidden=True, help="Deprecated name of --chunks."),
    calib_samples: int = typer.Option(32, "--calib-samples", metavar="N", help="gptq/awq/w8a8: calibration windows sampled from --calib (default: built-in text)."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", metavar="N", help="gptq/awq/w8a8: tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="gptq/awq/w8a8: seed of the calibration sampling."),
    damp: float = typer.Option(0.01, "--damp", metavar="X", help="gptq: dampening, as a fraction of the mean Hessian diagonal."),
    act_order: bool = typer.Option(False, "--act-order", help="gptq: quantize columns by descending Hessian diagonal."),
    static_groups: bool = typer.Option(False, "--static-groups", help="gptq: fit group parameters before the updates (with --act-order)."),
    mse: bool = typer.Option(False, "--mse", help="gptq and group-wise rtn: shrink each group's min/max range where that lowers its rounding error (helps at 2-3 bits)."),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="nf4: quantize the block absmax values again (bitsandbytes' compress_statistics)."),
    observer: str = typer.Option("minmax", "--observer", metavar="NAME", help="w8a8 static activation ranges: minmax, percentile, entropy or mse."),
    smooth: Optional[float] = typer.Option(None, "--smooth", metavar="ALPHA", help="w8a8: SmoothQuant migration strength in [0, 1] (e.g. 0.5); llama-family models."),
    act_mode: str = typer.Option("static", "--act-mode", metavar="MODE", help="w8a8 activations: static (one calibrated scale per tensor) or dynamic (per token at run time)."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Re-quantize a source that is already quantized (a Q4_1 GGUF, a GPTQ checkpoint); f32/f16/bf16 never need it."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    threads: Optional[int] = _threads_option(),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    quiet: bool = _quiet(),
    verbose: bool = _verbose(),
) -> None:
    """Quantize a checkpoint into a qconvert container.

    Example: qconvert quantize demo:stories260K --method rtn --bits 8 -o s.q8
    """
    from .catalog import method_names, unknown_method_message
    from .convert import quantize as run_quantize

    started = time.perf_counter()
    say = _Say(quiet, verbose, as_json)
    if calib_chunks is not None:
        if chunks is not None and chunks != calib_chunks:
            raise QConvertError("give --chunks only (--calib-chunks is its old name)")
        say.note("note: --calib-chunks is deprecated; use --chunks")
        chunks = calib_chunks
    onnx = source.lower().endswith(".onnx")
    method = method.lower()
    if not onnx:
        if method not in method_names():
            raise QConvertError(unknown_method_message(method))
        _refuse_ignored_options(ctx, method)
    _check_output(output, [source], force)
    calib_label = ("importance matrix" if method not in ("gptq", "awq", "w8a8") else
                   {"gptq": "GPTQ, layer by layer", "awq": "AWQ scale search, layer by layer"}.get(method, "calibration windows"))
    with _threads(threads), _Bars(not say.quiet and err.is_terminal) as bars:
        result = run_quantize(
            source, output, method=method, bits=bits, group=group, sym=sym, keep=keep,
            tensor_types=tensor_type, revision=revision, imatrix=imatrix, calib=calib, calib_chunks=chunks,
            calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, damp=damp, act_order=act_order,
            static_groups=static_groups, mse=mse, double_quant=double_quant, observer=observer, smooth=smooth,
            act_mode=act_mode, allow_requantize=allow_requantize, threads=threads,
            progress=lambda i, n, plan: bars.update("quantizing", i, n, f"{plan.name} -> {plan.type_name}"),
            calib_progress=bars.phase(calib_label),
        )
    seconds = time.perf_counter() - started
    types: dict[str, int] = {}
    for p in result.plans:
        types[p.type_name] = types.get(p.type_name, 0) + 1
    size = result.output.stat().st_size
    notes = sorted({f"{p.reason} -> {p.type_name}" for p in result.plans if p.reason.startswith("fallback")})
    if as_json:
        print(json.dumps({"output": str(result.output), "file_bytes": size, "seconds": round(seconds, 3),
                          "tensors": len(result.plans), "types": types, "notes": notes, "warnings": result.warnings},
                         indent=2))
        return
    for warning in result.warnings:
        say.note(f"warning: {warning}")
    for note in notes:
        say.note(f"note: {note}")
    for p in result.plans:
        say.detail(f"  {p.name}  {'x'.join(map(str, p.shape))}  {p.source_type} -> {p.type_name}  ({p.reason})")
    type_text = ", ".join(f"{n}x {t}" for t, n in sorted(types.items()))
    say.result(f"wrote {result.output} ({_human_bytes(size)}, {len(result.plans)} tensors: {type_text}) in {seconds:.1f} s")


@command()
@_handle_errors
def inspect(
    path: Path = typer.Argument(..., metavar="FILE", help="Container file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Check every tensor's checksum (exit 1 if any fails)."),
    quiet: bool = _quiet(),
    verbose: bool = _verbose(),
) -> None:
    """Show a container's header, provenance, recipe and tensor table.

    Example: qconvert inspect s.q8 --json
    """
    from .api import inspect as run_inspect

    say = _Say(quiet, verbose)
    info = run_inspect(path, verify=verify)
    if as_json:
        print(json.dumps(info, indent=2))
    elif not say.quiet:
        _print_summary(info, say.verbose)
    if verify and info["corrupt_tensors"]:
        raise QConvertError(f"{len(info['corrupt_tensors'])} tensors fail their checksum: {', '.join(info['corrupt_tensors'][:5])}")


def _print_summary(info: dict, verbose: bool) -> None:
    tot = info["totals"]
    out.print(f"[bold]{escape(info['path'])}[/]  qconvert container v{info['format_version']}, {_human_bytes(info['file_bytes'])}, written by qconvert {info['qconvert_version']}")
    out.print(f"architecture: {info['architecture']}  " + "  ".join(f"{k}={v}" for k, v in info["config"].items()), highlight=False)
    src = info["source"]
    src_line = f"source: {src.get('kind')} {src.get('id')}"
    if src.get("revision") or src.get("commit"):
        src_line += f" @ {src.get('commit') or src.get('revision')}"
    out.print(src_line, highlight=False)
    out.print(f"source quantization: {info['source_quantization']}", highlight=False)
    for f in src.get("files", []):
        out.print(f"  {f['name']}  {f['bytes']} bytes  sha256 {f.get('sha256', '-')}", highlight=False)
    out.print("recipe: " + json.dumps(info["recipe"]), highlight=False)
    if not info.get("has_tokenizer", True):
        out.print("tokenizer: none (run, eval and GGUF export need one)", highlight=False)
    table = Table(show_header=True, header_style="bold", box=None)
    for col, justify in (("tensor", "left"), ("shape", "left"), ("type", "left"), ("bytes", "right"), ("bpw", "right")):
        table.add_column(col, justify=justify)
    if verbose:
        table.add_column("params")
    for t in info["tensors"]:
        row = [t["name"], "x".join(map(str, t["shape"])), t["type"], f"{t['bytes']:,}", f"{t['bits_per_weight']:.3f}"]
        table.add_row(*row, *([escape(json.dumps(t.get("params", {})))] if verbose else []))
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


@command()
@_handle_errors
def run(
    path: Path = typer.Argument(..., metavar="FILE", help="Container file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", metavar="TEXT", help="Text to continue (language models)."),
    text: Optional[str] = typer.Option(None, "--text", metavar="TEXT", help="Text to embed (BERT encoders)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", metavar="N", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", metavar="T", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", metavar="K", help="Sample from the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", help="Sample from the smallest set with this much probability."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Random seed for sampling (same seed, same text)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of streaming it."),
    inputs: List[str] = typer.Option([], "--input", "-i", metavar="FILE", help="ONNX models: input FILE.npy, NAME=FILE.npy (repeatable) or FILE.npz."),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="ONNX models: write the output(s) to FILE.npy (.npz for several)."),
    engine: Optional[str] = typer.Option(None, "--engine", metavar="NAME", help="ONNX models: onnxruntime or reference (default: onnxruntime when installed)."),
    threads: Optional[int] = _threads_option(),
    quiet: bool = _quiet(),
    verbose: bool = _verbose(),
) -> None:
    """Generate text with a container's model on the CPU (or embed text with an encoder).

    Example: qconvert run s.q8 --prompt "Once upon a time" --max-tokens 30
    """
    from .api import embed, generate
    from .container import open_container

    say = _Say(quiet, verbose)
    with _threads(threads), open_container(path) as c:
        if c.architecture == "onnx":
            return _run_onnx(c, inputs, output_file, engine, as_json, say)
        if c.architecture == "bert":
            if text is None:
                raise QConvertError("this is an encoder: give --text to embed (it does not generate)")
            vec = embed(c, text)
            if as_json:
                print(json.dumps({"text": text, "dim": int(vec.size), "embedding": [float(v) for v in vec]}))
            else:
                print(" ".join(f"{v:.6f}" for v in vec))
            return
        if prompt is None:
            raise QConvertError("give --prompt TEXT to generate from")

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        if not as_json:
            stream(prompt if not chat else "")
        g = generate(c, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     chat=chat, on_text=None if as_json else stream)
    if as_json:
        print(json.dumps({
            "prompt": prompt, "text": g.text, "ids": g.ids,
            "prompt_tokens": g.prompt_tokens, "generated_tokens": g.generated_tokens,
            "prompt_tokens_per_s": round(g.prompt_tokens_per_s, 2), "decode_tokens_per_s": round(g.decode_tokens_per_s, 2),
        }, indent=2))
        return
    sys.stdout.write("\n")
    say.detail(f"generated ids: {g.ids}")
    say.note(f"prompt: {g.prompt_tokens} tokens, {g.prompt_tokens_per_s:.1f} tokens/s;"
             f" generation: {g.generated_tokens} tokens, {g.decode_tokens_per_s:.1f} tokens/s")


@command()
@_handle_errors
def imatrix(
    model: str = typer.Argument(..., metavar="MODEL", help="Container, or source (HF folder / hub id / .gguf) to run."),
    calib: Path = typer.Option(..., "--calib", metavar="TEXT", help="Calibration text file."),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="File to write: FILE.dat is llama.cpp's imatrix.dat, FILE.gguf its GGUF imatrix (both load in llama-quantize --imatrix); any other name a qconvert container."),
    ctx: int = typer.Option(512, "--ctx", metavar="N", help="Tokens per window."),
    chunks: Optional[int] = typer.Option(None, "--chunks", metavar="N", help="Use only the first N windows."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    threads: Optional[int] = _threads_option(),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    quiet: bool = _quiet(),
    verbose: bool = _verbose(),
) -> None:
    """Collect an importance matrix (mean x^2 per input column of every weight matrix).

    Example: qconvert imatrix smollm2.f32 --calib input.txt --chunks 32 -o imatrix.gguf
    """
    from .api import imatrix as run_imatrix

    started = time.perf_counter()
    say = _Say(quiet, verbose, as_json)
    _check_output(output, [model, calib], force)
    with _threads(threads), _Bars(not say.quiet and err.is_terminal) as bars:
        result = run_imatrix(model, calib, output, ctx=ctx, chunks=chunks, progress=bars.phase("importance matrix"),
                             note=say.note)
    info = result.info
    if as_json:
        print(json.dumps({"output": str(output), "entries": len(result.importance), **info}, indent=2))
        return
    for name, v in result.importance.items():
        say.detail(f"  {name}  {v.size} columns, mean {float(v.mean()):.4g}, max {float(v.max()):.4g}")
    say.result(f"wrote {output} ({info['format']}): {len(result.importance)} matrices, {info['tokens']} tokens"
               f" in {info['chunks']} windows in {time.perf_counter() - started:.1f} s")


@command()
@_handle_errors
def export(
    path: Path = typer.Argument(..., metavar="FILE", help="Container file."),
    to: str = typer.Option(..., "--to", metavar="FORMAT", help="Target format: gguf, or onnx (a QDQ model; ONNX containers)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="File to write."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Convert tensors whose type the target lacks (to Q8_0) instead of refusing."),
    allow_requant: bool = typer.Option(False, "--allow-requant", hidden=True, help="Old name of --allow-requantize."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    quiet: bool = _quiet(),
    verbose: bool = _verbose(),
) -> None:
    """Export a container to GGUF (llama.cpp), copying every tensor's blocks unchanged.

    Example: qconvert export smollm2.q4_k_m --to gguf -o smollm2.Q4_K_M.gguf
    """
    from .api import export as run_export

    say = _Say(quiet, verbose, as_json)
    _check_output(output, [path], force)
    result = run_export(path, output, to=to, allow_requantize=allow_requantize or allow_requant)
    summary = result.summary
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    if result.format == "onnx":
        w = summary["weights"]
        say.result(f"wrote {output} (QDQ ONNX, opset {summary['opset']}, {_human_bytes(summary['file_bytes'])}: weights"
                   f" {w['per_channel']} per-channel int8, {w['blocked']} block-wise, {w['nbits']} MatMulNBits, {w['float']} float;"
                   f" {summary['activations']} activation Q/DQ pairs)")
        return
    for name in summary.get("requantized", []):
        say.detail(f"  {name}: converted to a type GGUF has")
    types = ", ".join(f"{n}x {t}" for t, n in sorted(summary["types"].items()))
    say.result(f"wrote {output} (GGUF v3, {_human_bytes(summary['file_bytes'])}, {summary['tensors']} tensors: {types})")


def _run_onnx(c: Any, inputs: List[str], output_file: Optional[Path], engine: Optional[str], as_json: bool, say: _Say) -> None:
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
    say.note(f"ran with {runner.engine_label}: {runner.mode}")
    for name, s in summary.items():
        stats = f"  min {s['min']:.6g} max {s['max']:.6g} mean {s['mean']:.6g}" if "min" in s else ""
        say.result(f"{name}: {s['dtype']} {s['shape']}{stats}")
    if output_file is not None:
        say.result(f"wrote {output_file}")


@command(name="eval")
@_handle_errors
def eval_cmd(
    path: Path = typer.Argument(..., metavar="FILE", help="Container file."),
    text: Path = typer.Option(..., "--text", metavar="FILE", help="Evaluation text (e.g. wiki.test.raw); CRLF is normalised."),
    reference: Optional[str] = typer.Option(None, "--reference", metavar="MODEL", help="Container, or source (HF folder / .gguf), to compare against: KLD, top-1 agreement, RMS dp."),
    ctx: int = typer.Option(512, "--ctx", metavar="N", help="Tokens per window (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", metavar="N", help="Evaluate only the first N windows."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Put BOS first in each window (default: when the tokenizer adds BOS)."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", metavar="X", help="Fail (exit 3) if PPL / reference PPL exceeds this."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", metavar="X", help="Fail (exit 3) if the mean KL divergence exceeds this."),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", metavar="X", help="Fail (exit 3) if the perplexity exceeds this."),
    threads: Optional[int] = _threads_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = _quiet(),
    verbose: bool = _verbose(),
) -> None:
    """Perplexity (llama.cpp's protocol), and KL divergence against a reference.

    Example: qconvert eval s.q4 --text wiki.test.raw --reference s.f32 --max-kld 0.05
    """
    from .api import evaluate
    from .errors import QualityGateError

    say = _Say(quiet, verbose, as_json)
    if (max_ppl_ratio is not None or max_kld is not None) and reference is None:
        raise QConvertError("--max-ppl-ratio and --max-kld need --reference")
    with _threads(threads), _Bars(not say.quiet and err.is_terminal) as bars:
        result = evaluate(path, text, reference=reference, ctx=ctx, chunks=chunks, bos=bos,
                          progress=bars.phase("evaluating"), note=say.note)
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
        for i, ppl in enumerate(result.per_chunk_ppl):
            say.detail(f"  window {i + 1}: PPL {ppl:.4f}")
        say.result(f"PPL {result.ppl:.4f} over {result.chunks} windows of {result.ctx} tokens"
                   f" ({result.tokens_scored} scored) in {result.seconds:.1f} s")
        if ref:
            say.result(f"reference PPL {ref['ppl']:.4f}, PPL ratio {ref['ppl_ratio']:.4f}, mean KLD {ref['kld_mean']:.6f}"
                       f" (p99 {ref['kld_p99']:.4f}), same top-1 token {100 * ref['top1_agreement']:.2f}%,"
                       f" RMS dp {100 * ref['rms_dp']:.3f}%")
    if failures:
        raise QualityGateError("quality gate failed: " + "; ".join(failures))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``--debug`` anywhere shows tracebacks."""
    global DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        DEBUG = True
        args = [a for a in args if a != "--debug"]
    signal.signal(signal.SIGTERM, _on_sigterm)
    app(args=args, prog_name="qconvert")


if __name__ == "__main__":
    main()
