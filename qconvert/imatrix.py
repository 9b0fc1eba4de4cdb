"""Importance matrix: per weight matrix, the mean of x_j^2 for each input column j over the
calibration tokens (llama.cpp's imatrix, a diagonal proxy for GPTQ's Hessian X^T X).

Collected by running the calibration text through our own runtime in windows of ``ctx``
tokens; the output projection is left out, as llama-imatrix does by default. Saved as a
qconvert container: one F32 tensor per weight matrix (same name), plus an ``imatrix``
metadata entry with the calibration text hash, token and window counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .container import ContainerWriter, TensorSpec, open_container
from .errors import QConvertError

IMATRIX_KEY = "imatrix"


def collect_imatrix(container, text: str, ctx: int = 512, chunks: int | None = None, progress=None):
    """Run ``text`` through the container's model; returns ({name: mean x^2}, info)."""
    from .evaluate import make_windows
    from .plan import output_tensor_name
    from .runtime.models import load_model
    from .runtime.tokenizer import Tokenizer
    from .runtime.weights import record_inputs

    model = load_model(container)
    if not hasattr(model, "forward"):
        raise QConvertError("an importance matrix needs a language model (llama or gpt2)")
    tok = Tokenizer.from_container(container)
    tokens = tok.encode(text, add_bos=False)
    windows = make_windows(tokens, ctx, chunks, tok.bos_id if tok.add_bos_default else None)
    skip = output_tensor_name(list(container.tensors), container.config)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: np.ndarray) -> None:
        if name == skip:
            return
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        sq = np.einsum("ti,ti->i", x, x)
        if name in sums:
            sums[name] += sq
        else:
            sums[name] = sq
        counts[name] = counts.get(name, 0) + x.shape[0]

    record_inputs(record)
    try:
        for i, w in enumerate(windows):
            model.forward(w, model.new_cache(ctx), all_logits=False)
            if progress is not None:
                progress(i + 1, len(windows))
    finally:
        record_inputs(None)
    importance = {n: (sums[n] / counts[n]).astype(np.float32) for n in sorted(sums)}
    info = {
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "text_chars": len(text),
        "tokens": len(windows) * ctx,
        "ctx": ctx,
        "chunks": len(windows),
        "model": container.source.get("id"),
    }
    return importance, info


def save_imatrix(path: str | Path, importance: dict[str, np.ndarray], info: dict) -> Path:
    specs = [TensorSpec(n, (int(v.size),), "F32") for n, v in importance.items()]
    from .blocks import by_name

    from . import __version__

    with ContainerWriter(path, {"qconvert.version": __version__, IMATRIX_KEY: info}, specs) as w:
        for n, v in importance.items():
            w.write(n, by_name("F32").quantize(v.reshape(1, -1)))
    return Path(path)


def load_imatrix(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """({tensor name: importance vector}, info with the file's sha256); llama.cpp's imatrix.dat
    and imatrix GGUF files are read too (qconvert/imatrix_files.py)."""
    from .imatrix_files import is_llama_imatrix, read_llama_imatrix

    if is_llama_imatrix(path):
        return read_llama_imatrix(path)
    with open_container(path) as c:
        info = c.metadata.get(IMATRIX_KEY)
        if not isinstance(info, dict):
            raise QConvertError(f"{path} is a qconvert container but not an importance matrix")
        importance = {}
        for name in c.tensors:
            v = c.tensor(name).reshape(-1).copy()
            if not np.isfinite(v).all() or (v < 0).any():
                raise QConvertError(f"importance matrix {path}: entry {name!r} has negative or non-finite values")
            importance[name] = v
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return importance, {**info, "file_sha256": digest}


def imatrix_for_source(source: str | Path, calib: str | Path, ctx: int = 512, chunks: int | None = None,
                       revision: str | None = None, progress=None) -> tuple[dict[str, np.ndarray], dict]:
    """Collect an importance matrix for a source checkpoint (via a temporary F32 container)."""
    import tempfile

    from .convert import quantize
    from .evaluate import read_text

    text = read_text(calib)
    with tempfile.TemporaryDirectory(prefix="qconvert-imatrix-") as tmp:
        ref = Path(tmp) / "f32.q"
        quantize(source, ref, method="f32", revision=revision)
        with open_container(ref) as c:
            importance, info = collect_imatrix(c, text, ctx=ctx, chunks=chunks, progress=progress)
    info["calibration_file"] = Path(calib).name
    return importance, info
