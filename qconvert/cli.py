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


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@_handle_errors
def quantize(
    source: str = typer.Argument(..., help="HF folder, hub id (owner/name) or .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="Container file to write."),
    method: str = typer.Option("rtn", "--method", "-m", help="rtn (with --bits/--asym); a llama.cpp K-quant mix: q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k; or f32/f16/bf16 (unquantized reference)."),
    bits: int = typer.Option(8, "--bits", "-b", help="Bits per weight: 4, 5 or 8."),
    group: int = typer.Option(32, "--group", "-g", help="Weights per scale (GGML blocks: 32)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (Q4_0/Q5_0/Q8_0) or with a min (Q4_1/Q5_1)."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Regex of tensor names to leave unquantized, e.g. 'lm_head|embed'."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE per-tensor override, e.g. 'down_proj=q8_0' (repeatable)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix from `qconvert imatrix` (weights the K-quant and Q4/Q5 searches)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text: compute an importance matrix from it first."),
    calib_chunks: Optional[int] = typer.Option(None, "--calib-chunks", help="Use only this many 512-token windows of --calib."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize a checkpoint into a qconvert container.

    Example: qconvert quantize ../shared/models/stories260K --method rtn --bits 8 -o s.q8
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
            progress=progress,
        )
    types: dict[str, int] = {}
    for p in result.plans:
        types[p.type_name] = types.get(p.type_name, 0) + 1
    size = result.output.stat().st_size
    notes = sorted({p.reason for p in result.plans if p.reason.startswith("fallback")})
    if as_json:
        print(json.dumps({"output": str(result.output), "file_bytes": size, "seconds": round(result.seconds, 3),
                          "tensors": len(result.plans), "types": types, "notes": notes}, indent=2))
        return
    for note in notes:
        err.print(f"note: {note} (stored as F16)", highlight=False)
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
    if "corrupt_tensors" in info:
        out.print("checksums: " + ("all tensors OK" if not info["corrupt_tensors"] else f"{len(info['corrupt_tensors'])} corrupt"))


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
) -> None:
    """Generate text with a container's model on the CPU (or embed text with an encoder).

    Example: qconvert run s.q8 --prompt "Once upon a time" --max-tokens 30
    """
    from .container import open_container
    from .runtime.generate import generate
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer

    with open_container(path) as c:
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
    to: str = typer.Option(..., "--to", help="Target format: gguf."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write."),
    allow_requant: bool = typer.Option(False, "--allow-requant", help="Convert tensors whose type the target lacks (to Q8_0) instead of refusing."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Export a container to GGUF (llama.cpp), copying every tensor's blocks unchanged.

    Example: qconvert export smollm2.q4_k_m --to gguf -o smollm2.Q4_K_M.gguf
    """
    from .container import open_container

    if to.lower() != "gguf":
        raise QConvertError(f"unknown export format {to!r}; available: gguf")
    from .export.gguf import export_gguf

    with open_container(path) as c:
        summary = export_gguf(c, output, allow_requant=allow_requant)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        types = ", ".join(f"{n}x {t}" for t, n in sorted(summary["types"].items()))
        out.print(f"wrote {output} (GGUF v3, {_human_bytes(summary['file_bytes'])}, {summary['tensors']} tensors: {types})", highlight=False)


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
