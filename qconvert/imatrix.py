"""Importance matrix: per weight matrix, the mean of x_j^2 for each input column j over the
calibration tokens (llama.cpp's imatrix, a diagonal proxy for GPTQ's Hessian X^T X).

Collected by the calibration pipeline (``calibrate.py``, the float model layer by layer) on
the calibration text in windows of ``ctx`` tokens; the output projection is left out, as
llama-imatrix does by default. Saved as a
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


def collect_imatrix(model, text: str, ctx: int = 512, chunks: int | None = None, progress=None):
    """Run ``text`` through ``model`` (an open source or container) layer by layer, in windows
    of ``ctx`` tokens; returns ({name: mean x^2}, info)."""
    from .evaluate import make_windows
    from .recipe import collect_importance, tokenizer_for
    from .sources.base import Source
    from .sources.container import source_from_container

    source = model if isinstance(model, Source) else source_from_container(model)
    tok = tokenizer_for(source)
    tokens = tok.encode(text, add_bos=False)
    windows = make_windows(tokens, ctx, chunks, tok.bos_id if tok.add_bos_default else None)
    importance = collect_importance(source, np.stack(windows), progress)
    info = {
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "text_chars": len(text),
        "tokens": len(windows) * ctx,
        "ctx": ctx,
        "chunks": len(windows),
        "model": source.provenance.get("id"),
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


def load_imatrix(path: str | Path, arch=None) -> tuple[dict[str, np.ndarray], dict]:
    """({tensor name: importance vector}, info with the file's sha256); llama.cpp's imatrix.dat
    and imatrix GGUF files are read too (qconvert/imatrix_files.py), their names by ``arch``
    (the model's family) when given."""
    from .imatrix_files import is_llama_imatrix, read_llama_imatrix

    if is_llama_imatrix(path):
        return read_llama_imatrix(path, arch)
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


def imatrix_for_source(source, calib: str | Path, ctx: int = 512, chunks: int | None = None,
                       revision: str | None = None, progress=None) -> tuple[dict[str, np.ndarray], dict]:
    """Collect an importance matrix for a source (an open :class:`Source`, or a path / hub id
    to open), with no temporary model on disk."""
    from .evaluate import read_text
    from .sources import Source, open_source

    text = read_text(calib)
    if isinstance(source, Source):
        importance, info = collect_imatrix(source, text, ctx=ctx, chunks=chunks, progress=progress)
    else:
        with open_source(str(source), revision=revision) as src:
            importance, info = collect_imatrix(src, text, ctx=ctx, chunks=chunks, progress=progress)
    info["calibration_file"] = Path(calib).name
    return importance, info
