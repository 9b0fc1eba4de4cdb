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
    method: str = typer.Option("rtn", "--method", "-m", help="Quantization method: rtn."),
    bits: int = typer.Option(8, "--bits", "-b", help="Bits per weight: 4, 5 or 8."),
    group: int = typer.Option(32, "--group", "-g", help="Weights per scale (GGML blocks: 32)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (Q4_0/Q5_0/Q8_0) or with a min (Q4_1/Q5_1)."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Regex of tensor names to leave unquantized, e.g. 'lm_head|embed'."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE per-tensor override, e.g. 'down_proj=q8_0' (repeatable)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
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
            tensor_types=tensor_type, revision=revision, progress=progress,
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
