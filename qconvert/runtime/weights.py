"""A container's tensors as the runtime sees them: matrices stay packed, vectors become float32."""

from __future__ import annotations

import numpy as np

from ..container import Container
from ..errors import QConvertError
from . import kernels


class Linear:
    """y = W x (+ b) computed on W's packed blocks, straight from the mmap."""

    def __init__(self, raw: np.ndarray, type_name: str, shape: tuple[int, int], bias: np.ndarray | None = None,
                 name: str | None = None, params: dict | None = None) -> None:
        if not kernels.has_kernel(type_name):
            raise QConvertError(f"the runtime has no kernel for block type {type_name} yet")
        self.raw, self.type_name, self.shape, self.bias = raw, type_name, shape, bias
        self.name = name  # the container tensor; None for projections that are not recorded
        self.params = params or {}  # the tensor entry's params (NF4_DQ's double-quant state)
        self.aux = kernels.prepare_aux(type_name, self.params, shape)
        # act-order (GPTQ): stored column j multiplies input feature input_perm[j]
        self.input_perm = None
        if "input_perm" in self.params:
            perm = np.asarray(self.params["input_perm"], dtype=np.int64)
            if perm.shape != (shape[1],) or not np.array_equal(np.sort(perm), np.arange(shape[1])):
                raise QConvertError(f"tensor {name}: input_perm is not a permutation of its {shape[1]} columns")
            self.input_perm = perm

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.input_perm is not None:
            x = x[..., self.input_perm]
        y = kernels.linear(self.raw, self.type_name, np.ascontiguousarray(x, dtype=np.float32), aux=self.aux)
        return y + self.bias if self.bias is not None else y


class Embedding:
    """Rows of a (vocab, dim) table, dequantized only for the ids asked for."""

    def __init__(self, raw: np.ndarray, type_name: str, shape: tuple[int, int], params: dict | None = None) -> None:
        self.raw, self.type_name, self.shape = raw, type_name, shape
        self.params = params or {}
        self.aux = kernels.prepare_aux(type_name, self.params, shape) if kernels.has_kernel(type_name) else None

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise QConvertError(f"token id out of range 0..{self.shape[0] - 1}")
        return kernels.embedding_rows(self.raw, self.type_name, ids, self.shape[1], aux=self.aux)

    def as_linear(self) -> Linear:
        return Linear(self.raw, self.type_name, self.shape, params=self.params)


class Weights:
    """Name-based access to a container's tensors, with an optional name prefix to try."""

    def __init__(self, container: Container, prefixes: tuple[str, ...] = ("",)) -> None:
        self.c = container
        self.prefixes = prefixes

    def name(self, name: str) -> str:
        for p in self.prefixes:
            if p + name in self.c.tensors:
                return p + name
        raise QConvertError(f"the container lacks tensor {name!r}, which this architecture needs")

    def has(self, name: str) -> bool:
        return any(p + name in self.c.tensors for p in self.prefixes)

    def vector(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.c.tensor(self.name(name)).reshape(-1), dtype=np.float32)

    def matrix(self, name: str) -> np.ndarray:
        return self.c.tensor(self.name(name))

    def linear(self, name: str, bias: str | None = None) -> Linear:
        full = self.name(name)
        info = self.c.tensors[full]
        if len(info.shape) != 2:
            raise QConvertError(f"tensor {full} should be a matrix, has shape {list(info.shape)}")
        b = self.vector(bias) if bias is not None and self.has(bias) else None
        return Linear(self.c.raw(full), info.block_type.name, info.shape, b, name=full, params=info.extra)

    def embedding(self, name: str) -> Embedding:
        full = self.name(name)
        info = self.c.tensors[full]
        return Embedding(self.c.raw(full), info.block_type.name, info.shape, params=info.extra)
