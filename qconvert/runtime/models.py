"""Architecture registry: ``model.architecture`` in the container picks the file that runs it."""

from __future__ import annotations

from ..container import Container
from ..errors import QConvertError
from . import kernels
from .weights import Weights


def load_model(container: Container):
    # The heavy products run in numba; OpenBLAS threads (used by numpy for attention) would
    # busy-wait after each call and starve them (kernels.blas_threads explains the numbers).
    kernels.blas_threads(1).__enter__()
    arch = container.architecture
    if arch == "onnx":
        raise QConvertError(
            f"{container.path} holds an ONNX graph, not a language model: run it with"
            " `qconvert run FILE --input x.npy`, or export it with `qconvert export FILE --to onnx`"
        )
    config = container.config
    if arch == "llama":
        from .llama import Llama

        return Llama(Weights(container), config)
    if arch == "gpt2":
        from .gpt2 import GPT2

        return GPT2(Weights(container, prefixes=("transformer.", "")), config)
    if arch == "bert":
        from .bert import Bert

        return Bert(Weights(container, prefixes=("", "bert.")), config)
    raise QConvertError(f"the runtime cannot run architecture {arch!r} (it runs llama, gpt2 and bert)")
