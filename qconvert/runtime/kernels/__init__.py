"""Matrix products straight on packed blocks, one kernel set per block type.

A weight matrix W of shape (out_features, in_features) is stored as uint8 bytes of shape
(out_features, row_bytes): each row is in_features / block_size blocks. The model code calls

    y = linear(raw, type_name, x)        # x (in,) -> (out,) ; x (T, in) -> (T, out)
    e = embedding_rows(raw, type_name, ids, row_length)

and never looks at the bytes itself. ``raw`` may be a read-only numpy memmap: nothing is
copied or dequantised wholesale (batched products dequantise a tile of rows at a time).

Adding a block type's kernels = adding a module to this package that calls
:func:`register_kernel`. Every public module here (name not starting with ``_``, other than
``reference``) is imported when the package is, so no model or dispatch code changes.

Kernel contract (what :func:`linear` guarantees a registered callable):
- ``matvec(raw, x) -> (out,) float32``; raw: C-contiguous, read-only uint8 (out, row_bytes)
  already checked against x's length; x: C-contiguous float32 (in,).
- ``matmul(raw, X) -> (T, out) float32``; X: C-contiguous float32 (T, in), T >= 2.
- ``dequant_rows(raw, ids, row_length, out=None) -> (len(ids), row_length) float32``;
  ids: int64, already range-checked; ``out`` a float32 buffer to fill, if given.
Any of them may be omitted; the missing ones are derived from the others (or from the
block codec in :mod:`qconvert.blocks` for dequantisation).

Types whose tensors carry params (FORMAT.md §4; e.g. NF4_DQ's double-quantization state)
register ``prepare(params, shape) -> aux`` as well; their three callables (all required)
take ``aux=`` as a keyword: ``matvec(raw, x, aux=)``, ``matmul(raw, X, aux=)``,
``dequant_rows(raw, ids, row_length, out=None, aux=)``. Callers build ``aux`` once per
tensor with :func:`prepare_aux` and pass it to ``linear(..., aux=)`` /
``embedding_rows(..., aux=)``; for every other type ``aux`` is None and ignored.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...errors import QConvertError

MatVec = Callable[[np.ndarray, np.ndarray], np.ndarray]
MatMul = Callable[[np.ndarray, np.ndarray], np.ndarray]
DequantRows = Callable[..., np.ndarray]
Prepare = Callable[[dict, tuple], Any]

#: batched products below this many tokens run the matvec kernel per token; from it up, rows
#: are dequantised to float32 a tile at a time and multiplied by all tokens at once.
SMALL_T = 3
#: float32 bytes of one dequantised tile in the generic (fallback) batched product.
TILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Kernel:
    type_name: str
    matvec: MatVec
    matmul: MatMul
    dequant_rows: DequantRows
    block_size: int | None
    type_size: int | None
    prepare: Prepare | None = None  # params -> aux, for types whose tensors carry params


_KERNELS: dict[str, Kernel] = {}


def _codec_dequant_rows(type_name: str) -> DequantRows:
    def dequant_rows(raw, ids, row_length, out=None):
        from ...blocks import by_name

        vals = by_name(type_name).dequantize(raw[ids], (len(ids), row_length))
        if out is None:
            return vals
        out[...] = vals
        return out

    return dequant_rows


def tiled_matmul(dequant_rows: DequantRows, raw: np.ndarray, X: np.ndarray, tile_bytes: int = TILE_BYTES) -> np.ndarray:
    """(T, in) x packed (out, in) -> (T, out) for types without a batched kernel of their own:
    dequantise ``tile_bytes`` of rows at a time to float32 and multiply them by every token
    with the numba GEMM micro-kernel (each weight decoded once per call).

    Not numpy's BLAS on purpose: OpenBLAS worker threads busy-wait after each call and starve
    the numba threads of the next kernel (measured: 37 us -> 7.7 ms per matvec on 2 cores)."""
    from ._ir import gemm_f32

    n_out = raw.shape[0]
    T, n_in = X.shape
    out = np.empty((T, n_out), np.float32)
    rows = int(max(16, min(n_out, tile_bytes // max(1, 4 * n_in))))
    buf = np.empty((rows, n_in), np.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        tile = dequant_rows(raw, np.arange(r0, r1, dtype=np.int64), n_in, buf[: r1 - r0])
        out[:, r0:r1] = gemm_f32(tile, X)
    return out


def make_matmul(matvec: MatVec | None, dequant_rows: DequantRows | None, small_t: int = SMALL_T) -> MatMul:
    """The generic batched product: matvec per token for few tokens, else :func:`tiled_matmul`."""

    def matmul(raw: np.ndarray, X: np.ndarray) -> np.ndarray:
        T = X.shape[0]
        if matvec is not None and (T < small_t or dequant_rows is None):
            out = np.empty((T, raw.shape[0]), np.float32)
            for t in range(T):
                out[t] = matvec(raw, X[t])
            return out
        return tiled_matmul(dequant_rows, raw, X)

    return matmul


def register_kernel(
    type_name: str,
    matvec: MatVec | None = None,
    matmul: MatMul | None = None,
    *,
    dequant_rows: DequantRows | None = None,
    block_size: int | None = None,
    type_size: int | None = None,
    replace: bool = False,
    prepare: Prepare | None = None,
) -> Kernel:
    """Register the kernels of block type ``type_name`` (see the module docstring).

    ``block_size``/``type_size`` let :func:`linear` check shapes without importing the
    codecs; when omitted they are looked up in :mod:`qconvert.blocks` on first use."""
    name = type_name.upper()
    if name in _KERNELS and not replace:
        raise ValueError(f"kernels for block type {name} registered twice")
    if matvec is None and matmul is None and dequant_rows is None:
        raise ValueError(f"register_kernel({name!r}) needs at least one of matvec, matmul, dequant_rows")
    if prepare is not None:
        if matvec is None or matmul is None or dequant_rows is None:
            raise ValueError(f"register_kernel({name!r}, prepare=...) needs matvec, matmul and dequant_rows")
        kernel = Kernel(name, matvec, matmul, dequant_rows, block_size, type_size, prepare)
        _KERNELS[name] = kernel
        return kernel
    dq = dequant_rows if dequant_rows is not None else _codec_dequant_rows(name)
    if matmul is None:
        matmul = make_matmul(matvec, dq)
    if matvec is None:
        mm = matmul

        def matvec(raw, x, _mm=mm):
            return _mm(raw, x[None, :])[0]

    kernel = Kernel(name, matvec, matmul, dq, block_size, type_size)
    _KERNELS[name] = kernel
    return kernel


def has_kernel(type_name: str) -> bool:
    return type_name.upper() in _KERNELS


def kernel_types() -> list[str]:
    return sorted(_KERNELS)


def get_kernel(type_name: str) -> Kernel:
    try:
        return _KERNELS[type_name.upper()]
    except KeyError:
        raise QConvertError(
            f"the runtime has no kernel for block type {type_name!r}; it has: {', '.join(kernel_types())}"
        ) from None


def prepare_aux(type_name: str, params: dict | None, shape: tuple[int, ...]) -> Any:
    """The per-tensor ``aux`` a kernel needs from the tensor's params (None for types
    without params). Build it once per weight matrix, not per call."""
    kernel = get_kernel(type_name)
    if kernel.prepare is None:
        return None
    return kernel.prepare(params or {}, tuple(shape))


def _aux_kw(kernel: Kernel, aux: Any) -> dict:
    if kernel.prepare is None:
        return {}
    if aux is None:
        raise QConvertError(
            f"{kernel.type_name} weights need their tensor params: pass aux=prepare_aux({kernel.type_name!r}, params, shape)"
        )
    return {"aux": aux}


def _sizes(kernel: Kernel) -> tuple[int, int]:
    if kernel.block_size is not None and kernel.type_size is not None:
        return kernel.block_size, kernel.type_size
    from ...blocks import by_name

    bt = by_name(kernel.type_name)
    return bt.block_size, bt.type_size


def _readonly_raw(raw: np.ndarray) -> np.ndarray:
    """C-contiguous, read-only uint8 view (one numba specialisation for files and arrays)."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise QConvertError(f"packed weights must be uint8 bytes, got {raw.dtype}")
    if raw.ndim != 2:
        raise QConvertError(f"packed weights must be 2-D (rows, row_bytes), got shape {raw.shape}")
    if not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
    if raw.flags.writeable:
        raw = raw.view()
        raw.flags.writeable = False
    return raw


def _row_length_check(kernel: Kernel, raw: np.ndarray, row_length: int) -> None:
    block_size, type_size = _sizes(kernel)
    if row_length <= 0 or row_length % block_size:
        raise QConvertError(
            f"{kernel.type_name} rows must be a positive multiple of {block_size} elements, got {row_length}"
        )
    want = row_length // block_size * type_size
    if raw.shape[1] != want:
        raise QConvertError(
            f"{kernel.type_name} rows of {row_length} elements take {want} bytes, the packed matrix has {raw.shape[1]}"
        )


def linear(raw: np.ndarray, type_name: str, x: np.ndarray, aux: Any = None) -> np.ndarray:
    """y = W @ x on packed W (out, row_bytes). x (in,) -> (out,); x (T, in) -> (T, out).
    ``aux``: :func:`prepare_aux` of the tensor's params, for types that have params."""
    kernel = get_kernel(type_name)
    kw = _aux_kw(kernel, aux)
    raw = _readonly_raw(raw)
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise QConvertError(f"linear() takes x of shape (in,) or (T, in), got {x.shape}")
    _row_length_check(kernel, raw, x.shape[-1])
    if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
        x = np.array(x, dtype=np.float32, order="C")
    if x.ndim == 1:
        return kernel.matvec(raw, x, **kw)
    if x.shape[0] == 1:
        return kernel.matvec(raw, x[0], **kw)[None, :]
    if x.shape[0] == 0:
        return np.zeros((0, raw.shape[0]), np.float32)
    return kernel.matmul(raw, x, **kw)


def embedding_rows(raw: np.ndarray, type_name: str, ids, row_length: int, aux: Any = None) -> np.ndarray:
    """Rows ``ids`` of a packed (rows, row_bytes) matrix as float32 (len(ids), row_length);
    only those rows are decoded. ``aux`` as for :func:`linear`."""
    kernel = get_kernel(type_name)
    kw = _aux_kw(kernel, aux)
    raw = _readonly_raw(raw)
    _row_length_check(kernel, raw, int(row_length))
    ids = np.asarray(ids)
    if ids.ndim != 1:
        ids = ids.reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise QConvertError(f"token ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= raw.shape[0]):
        bad = int(ids[(ids < 0) | (ids >= raw.shape[0])][0])
        raise QConvertError(f"token id {bad} is outside the embedding table of {raw.shape[0]} rows")
    ids = np.ascontiguousarray(ids)
    if ids.size == 0:
        return np.zeros((0, int(row_length)), np.float32)
    return kernel.dequant_rows(raw, ids, int(row_length), **kw)


def blas_threads(n: int = 1):
    """Context manager limiting numpy's BLAS to ``n`` threads while a model runs.

    OpenBLAS worker threads busy-wait after every multi-threaded call; the numba threads of
    the next kernel then wait for a core (measured on 2 cores: a 31 us Q4_0 matvec took
    3.9 ms after a 2-thread sgemv, 38 us with BLAS limited to 1 thread). All heavy products
    go through these kernels, so the runtime loses nothing by keeping BLAS single-threaded.
    Uses threadpoolctl when installed; otherwise does nothing (set OPENBLAS_NUM_THREADS=1
    before numpy is imported instead)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def _load_families() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "reference":
            continue
        importlib.import_module(f"{__name__}.{info.name}")


_load_families()

__all__ = [
    "Kernel",
    "SMALL_T",
    "blas_threads",
    "embedding_rows",
    "get_kernel",
    "has_kernel",
    "kernel_types",
    "linear",
    "make_matmul",
    "prepare_aux",
    "register_kernel",
    "tiled_matmul",
]
