"""The Python side every numba kernel family shares: allocate outputs, pick matvec or the
tiled matmul by the number of tokens, name the functions, register them.

A family supplies three numba calls with its block kind (and any extras) already bound:
``matvec_into(raw, x, out)``, ``matmul_into(raw, Xp, T, n_in, out)`` (Xp: the padded GEMM
operand) and ``dequant_into(raw, ids, out)``.
"""

from __future__ import annotations

import numpy as np

from . import SMALL_T, register_kernel
from ._ir import gemm_operand, k_padded


def register_family_kernel(name: str, block_size: int, type_size: int, matvec_into, matmul_into, dequant_into) -> None:
    def matvec(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.empty(raw.shape[0], np.float32)
        matvec_into(raw, x, out)
        return out

    def matmul(raw: np.ndarray, X: np.ndarray) -> np.ndarray:
        T, n_in = X.shape
        if T < SMALL_T:
            return np.stack([matvec(raw, X[t]) for t in range(T)])
        out = np.empty((T, raw.shape[0]), np.float32)
        matmul_into(raw, gemm_operand(X, k_padded(n_in)), T, n_in, out)
        return out

    def dequant_rows(raw: np.ndarray, ids: np.ndarray, row_length: int, out=None) -> np.ndarray:
        if out is None:
            out = np.empty((ids.shape[0], row_length), np.float32)
        dequant_into(raw, ids, out)
        return out

    matvec.__name__ = f"matvec_{name.lower()}"
    matmul.__name__ = f"matmul_{name.lower()}"
    dequant_rows.__name__ = f"dequant_rows_{name.lower()}"
    register_kernel(name, matvec, matmul, dequant_rows=dequant_rows, block_size=block_size, type_size=type_size)
