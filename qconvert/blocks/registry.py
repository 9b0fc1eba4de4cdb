"""One table of every block type: the writer, the reader, ``inspect``, the runtime and
FORMAT.md all agree on it (a test checks FORMAT.md and spec/ against this table).

A block type turns a row of floats into fixed-size blocks of bytes. Every tensor stored in
a container is a stack of rows (last axis contiguous, numpy order); each row is cut into
``block_size`` elements and each piece becomes ``type_size`` bytes.

Type ids equal GGML's ``ggml_type`` ids wherever GGML has the same bytes, so that GGUF export
is a re-wrap; qconvert's own types use ids from 256 up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import QConvertError

QuantizeBlocks = Callable[[np.ndarray], np.ndarray]
DequantizeBlocks = Callable[[np.ndarray], np.ndarray]
# (rows, row_length) float32, importance (row_length,) float32 or None -> (rows, row_bytes) uint8
QuantizeRows = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
# Types with per-tensor side data (FORMAT.md §4 ``params``), e.g. NF4_DQ:
# (rows, row_length) float32 -> ((rows, row_bytes) uint8, params dict)
QuantizeTensor = Callable[[np.ndarray], "tuple[np.ndarray, dict]"]
# (n_blocks, type_size) uint8 of a whole tensor (row-major block order), params -> (n_blocks, block_size) float32
DequantizeTensor = Callable[[np.ndarray, dict], np.ndarray]


@dataclass(frozen=True)
class BlockType:
    id: int  # u16 in the container; == ggml_type where ggml is True
    name: str  # upper-case, e.g. "Q4_0"
    block_size: int  # elements per block
    type_size: int  # bytes per block
    quantize_blocks: QuantizeBlocks | None  # (n, block_size) float32 -> (n, type_size) uint8
    dequantize_blocks: DequantizeBlocks  # (n, type_size) uint8 -> (n, block_size) float32
    ggml: bool = True  # GGML has this type with identical bytes
    description: str = ""
    is_float: bool = field(default=False)
    # Row-level quantizer for types whose search looks beyond one block or takes an importance
    # matrix (llama.cpp's imatrix: one non-negative weight per input column). When set, it is
    # used instead of quantize_blocks.
    quantize_rows: QuantizeRows | None = field(default=None, repr=False)
    # Types whose tensors carry params: the tensor-level codec pair (both set, or neither),
    # an upper bound on the params' canonical JSON length for a tensor shape (so a writer can
    # reserve header space before quantizing), and the params' side data in bits (counted
    # as binary, for bits-per-weight figures).
    quantize_tensor: QuantizeTensor | None = field(default=None, repr=False)
    dequantize_tensor: DequantizeTensor | None = field(default=None, repr=False)
    params_max_len: Callable[[tuple[int, ...]], int] | None = field(default=None, repr=False)
    params_bits: Callable[[dict], int] | None = field(default=None, repr=False)

    @property
    def has_params(self) -> bool:
        """True when this type's tensors need their params to be decoded."""
        return self.dequantize_tensor is not None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def can_hold(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and shape[-1] % self.block_size == 0

    def row_bytes(self, row_length: int) -> int:
        if row_length % self.block_size:
            raise QConvertError(
                f"{self.name} needs rows that are a multiple of {self.block_size} elements, got {row_length}"
            )
        return row_length // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        # Python ints: a product of hostile dimensions must not wrap around (np.prod does)
        return math.prod(int(d) for d in shape[:-1]) * self.row_bytes(int(shape[-1]) if shape else 1)

    def quantize(self, values: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """Float array (last axis a multiple of block_size) -> uint8 array (rows, row_bytes).

        ``importance``: optional per-column weights (length = row length) for types that use
        them; types that do not ignore it (as llama.cpp ignores an imatrix for Q8_0)."""
        values = np.asarray(values, dtype=np.float32)
        shape = values.shape if values.ndim else (1,)
        row_bytes = self.row_bytes(shape[-1])
        if self.quantize_tensor is not None:
            raise QConvertError(
                f"{self.name} tensors carry params (FORMAT.md §4): quantize them with quantize_with_params()"
            )
        if self.quantize_rows is not None:
            rows = np.ascontiguousarray(values).reshape(-1, shape[-1])
            if importance is not None:
                importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
                if importance.size != shape[-1]:
                    raise QConvertError(
                        f"importance vector has {importance.size} values, the rows have {shape[-1]}"
                    )
            packed = self.quantize_rows(rows, importance)
            assert packed.dtype == np.uint8 and packed.shape == (rows.shape[0], row_bytes)
            return packed
        if self.quantize_blocks is None:
            raise QConvertError(f"block type {self.name} can be read but not written by qconvert")
        blocks = np.ascontiguousarray(values).reshape(-1, self.block_size)
        packed = self.quantize_blocks(blocks)
        assert packed.dtype == np.uint8 and packed.shape == (blocks.shape[0], self.type_size)
        return packed.reshape(-1, row_bytes)

    def quantize_with_params(
        self, values: np.ndarray, importance: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict]:
        """Like :meth:`quantize`, also returning the tensor's params (``{}`` for types that
        take none); store them as the tensor entry's params (``TensorSpec.extra``)."""
        if self.quantize_tensor is None:
            return self.quantize(values, importance), {}
        values = np.asarray(values, dtype=np.float32)
        shape = values.shape if values.ndim else (1,)
        row_bytes = self.row_bytes(shape[-1])
        rows = np.ascontiguousarray(values).reshape(-1, shape[-1])
        packed, params = self.quantize_tensor(rows)
        assert packed.dtype == np.uint8 and packed.shape == (rows.shape[0], row_bytes)
        return packed, params

    def dequantize(self, raw: np.ndarray, shape: tuple[int, ...], params: dict | None = None) -> np.ndarray:
        """uint8 bytes of a whole tensor -> float32 array of ``shape``. ``params``: the tensor
        entry's params; needed by the types that have them (:attr:`has_params`), ignored by
        the others."""
        raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
        if raw.size != self.nbytes(shape):
            raise QConvertError(
                f"{self.name} tensor of shape {list(shape)} needs {self.nbytes(shape)} bytes, got {raw.size}"
            )
        blocks = raw.reshape(-1, self.type_size)
        if self.dequantize_tensor is not None:
            return self.dequantize_tensor(blocks, params or {}).astype(np.float32, copy=False).reshape(shape)
        return self.dequantize_blocks(blocks).astype(np.float32, copy=False).reshape(shape)


_BY_ID: dict[int, BlockType] = {}
_BY_NAME: dict[str, BlockType] = {}


def register(block_type: BlockType) -> BlockType:
    if block_type.id in _BY_ID or block_type.name in _BY_NAME:
        raise ValueError(f"block type {block_type.name} (id {block_type.id}) registered twice")
    if not 0 <= block_type.id < 2**16:
        raise ValueError("block type ids are u16")
    _BY_ID[block_type.id] = block_type
    _BY_NAME[block_type.name] = block_type
    return block_type


def by_id(type_id: int) -> BlockType:
    try:
        return _BY_ID[type_id]
    except KeyError:
        raise QConvertError(f"unknown block type id {type_id}: this file needs a newer qconvert") from None


def by_name(name: str) -> BlockType:
    try:
        return _BY_NAME[name.upper()]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise QConvertError(f"unknown block type {name!r}; known types: {known}") from None


def all_types() -> list[BlockType]:
    return sorted(_BY_ID.values(), key=lambda t: t.id)
